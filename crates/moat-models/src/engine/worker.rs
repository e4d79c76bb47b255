//! The model worker: the `moat` binary re-executed in a hidden role, one
//! process per loaded model. It owns the llama.cpp model and one context
//! whose KV cache the slots share, and runs the scheduling loop: every step
//! decodes one batch holding the next token of every generating slot plus a
//! chunk of every prompt still being read (continuous batching), and new
//! requests join between steps. A slot keeps the tokens it has in the cache
//! after its request ends, so the next request that shares a prefix with
//! them (an agent resending its conversation) only pays for the new tail.
//!
//! Prompts are tokenized on the thread that reads the runner's messages,
//! not in the scheduling loop, so that a long prompt delays only its own
//! request; a step reads at most a micro-batch of prompt tokens, shortest
//! remaining prompt first, so a short request's first token waits for at
//! most one such step of another's.
//!
//! The slots share one KV cache (llama.cpp's unified cache), so that four
//! slots cost what one context costs and one request can still use all of
//! it. When the worker ends (its socket closes: keep-alive, `unload`, the
//! daemon's end), it saves its slots' prefixes to the prompt cache on disk
//! (`prompt_cache.rs`), and a later worker restores one instead of reading
//! a prompt that starts with it again.
//!
//! It talks to the runner over its standard input, a Unix socket; anything
//! llama.cpp prints goes to standard error, the model's log.

use std::collections::VecDeque;
use std::io::BufWriter;
use std::num::NonZeroU32;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Instant;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use llama_cpp_2::LlamaStateSeqFlags;

use super::cores::Cores;
use super::prompt_cache::{self, PromptCache};

use super::protocol::{
    read_frame, write_frame, Finish, FromWorker, Generate, LoadSpec, Loaded, Sampling, Timings,
    ToWorker,
};
use super::text::{Step, TextOut};
use super::tokens::Tokenizer;

/// The argument that makes `moat` a model worker.
pub const ROLE: &str = "__model-worker";

/// Entry point of the worker role; returns the process exit code.
pub fn worker_main() -> i32 {
    // No PR_SET_PDEATHSIG: it fires when the *thread* that started the
    // worker ends, and the runner starts workers from pooled threads. The
    // end of the socket tells the worker that the runner is gone instead.
    let sock = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            eprintln!("moat model worker: no socket on standard input: {e}");
            return 2;
        }
    };
    match run(sock) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("moat model worker: {e}");
            1
        }
    }
}

fn run(sock: UnixStream) -> Result<(), String> {
    let mut reader = sock.try_clone().map_err(|e| e.to_string())?;
    let mut out = BufWriter::new(sock);
    let spec = match read_frame::<ToWorker>(&mut reader).map_err(|e| e.to_string())? {
        Some(ToWorker::Load(spec)) => spec,
        Some(other) => return Err(format!("expected a load request first, got {other:?}")),
        None => return Ok(()),
    };
    let send = |out: &mut BufWriter<UnixStream>, msg: &FromWorker| {
        write_frame(out, msg).map_err(|e| format!("the runner went away: {e}"))
    };
    let engine = match Engine::load(&spec) {
        Ok(engine) => engine,
        Err(error) => {
            send(
                &mut out,
                &FromWorker::LoadFailed {
                    error: error.clone(),
                },
            )?;
            return Err(error);
        }
    };
    let mut sched = match Scheduler::new(&engine, &spec) {
        Ok(s) => s,
        Err(error) => {
            send(
                &mut out,
                &FromWorker::LoadFailed {
                    error: error.clone(),
                },
            )?;
            return Err(error);
        }
    };
    send(&mut out, &FromWorker::Loaded(sched.loaded(&engine)))?;

    let prepare = Prepare {
        tokenizer: Tokenizer::new(&engine.model),
        n_ctx: sched.seq_ctx() as usize,
    };
    let closer = reader.try_clone().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            while let Ok(Some(msg)) = read_frame::<ToWorker>(&mut reader) {
                if tx.send(prepare.inbound(msg)).is_err() {
                    return;
                }
            }
        });
        let served = sched.serve(&rx, &mut out);
        // The reader blocks on the socket; the scope waits for it.
        let _ = closer.shutdown(std::net::Shutdown::Both);
        sched.save_prefixes();
        served
    })
}

/// What the scheduling loop gets from the reader: requests with their
/// prompts already tokenized.
enum Inbound {
    Generate(Box<Generate>, Vec<LlamaToken>),
    Cancel(u64),
    Embed {
        id: u64,
        inputs: Vec<Vec<LlamaToken>>,
    },
    /// Answered by the reader itself (tokens, a refused prompt).
    Answer(FromWorker),
    Nothing,
}

/// The reader's side: tokenizing, and refusing what cannot fit.
struct Prepare<'m> {
    tokenizer: Tokenizer<'m>,
    /// Tokens of context per request.
    n_ctx: usize,
}

impl Prepare<'_> {
    fn inbound(&self, msg: ToWorker) -> Inbound {
        match msg {
            ToWorker::Generate(g) => match self.prompt(&g.prompt) {
                Ok(tokens) => Inbound::Generate(Box::new(g), tokens),
                Err(error) => Inbound::Answer(FromWorker::Failed {
                    id: g.id,
                    status: 400,
                    error,
                }),
            },
            ToWorker::Cancel { id } => Inbound::Cancel(id),
            ToWorker::Tokenize { id, text, special } => Inbound::Answer(FromWorker::Tokens {
                id,
                tokens: self.tokenize(&text, special).iter().map(|t| t.0).collect(),
            }),
            ToWorker::Embed { id, inputs } => Inbound::Embed {
                id,
                inputs: inputs.iter().map(|t| self.tokenize(t, true)).collect(),
            },
            ToWorker::Load(_) => Inbound::Nothing,
        }
    }

    /// A prompt's tokens; refused unread when it has more bytes than the
    /// context could hold tokens (each token is at most the longest
    /// token's text; twice that for the whitespace some tokenizers drop),
    /// so a huge prompt costs nothing here.
    fn prompt(&self, text: &str) -> Result<Vec<LlamaToken>, String> {
        let most = self
            .n_ctx
            .saturating_mul(self.tokenizer.longest_token())
            .saturating_mul(2);
        if text.len() > most {
            return Err(format!(
                "the prompt is {} bytes, more than a context of {} tokens can hold; shorten it or raise the context with `moat model configure --context-size N MODEL`",
                text.len(),
                self.n_ctx
            ));
        }
        Ok(self.tokenize(text, true))
    }

    fn tokenize(&self, text: &str, special: bool) -> Vec<LlamaToken> {
        let mut tokens = self.tokenizer.tokenize(text, special, special);
        // Templates that write the BOS text themselves would get it twice.
        let bos = self.tokenizer.bos();
        if tokens.len() >= 2 && tokens[0] == bos && tokens[1] == bos {
            tokens.remove(0);
        }
        tokens
    }
}

/// The backend and the model, which contexts borrow.
struct Engine {
    backend: LlamaBackend,
    model: LlamaModel,
    load_ms: f64,
}

impl Engine {
    fn load(spec: &LoadSpec) -> Result<Engine, String> {
        // The header is checked in Rust before llama.cpp reads a byte of it.
        crate::gguf::read_file(&spec.gguf)
            .map_err(|e| format!("{} is not a usable GGUF file: {e}", spec.gguf.display()))?;
        llama_cpp_2::send_logs_to_tracing(
            llama_cpp_2::LogOptions::default().with_logs_enabled(false),
        );
        let backend = LlamaBackend::init().map_err(|e| e.to_string())?;
        let t = Instant::now();
        let model = LlamaModel::load_from_file(&backend, &spec.gguf, &LlamaModelParams::default())
            .map_err(|e| format!("llama.cpp could not load {}: {e}", spec.gguf.display()))?;
        Ok(Engine {
            backend,
            model,
            load_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// One sequence of the shared context.
struct Slot {
    seq: i32,
    /// Tokens whose keys and values are in the cache, positions 0..len.
    cached: Vec<LlamaToken>,
    active: Option<Active>,
    /// When it last served a request (a step counter), for eviction.
    last_used: u64,
    /// Requests that found a useful prefix of theirs in this slot: what
    /// makes its cache worth saving when the worker ends.
    hits: u32,
    /// The length of the last prompt it read: where a sliding-window
    /// model's prefix is saved (see `save_prefixes`).
    prompt_len: usize,
}

struct Active {
    id: u64,
    prompt: Vec<LlamaToken>,
    cache_n: u32,
    sampler: LlamaSampler,
    generated: u32,
    max_tokens: u32,
    ignore_eos: bool,
    special: bool,
    text: TextOut,
    stop_word: Option<String>,
    /// The token sampled last, to be decoded in the next step.
    next: Option<LlamaToken>,
    /// Where this slot's logits are in the batch being decoded.
    logits_at: Option<i32>,
    started: Instant,
    prompt_done: Option<Instant>,
}

impl Active {
    fn prefilling(&self, slot_cached: usize) -> bool {
        slot_cached < self.prompt.len()
    }
}

struct Scheduler<'m> {
    engine: &'m Engine,
    ctx: LlamaContext<'m>,
    embed_ctx: Option<LlamaContext<'m>>,
    spec: LoadSpec,
    slots: Vec<Slot>,
    queue: VecDeque<(Box<Generate>, Vec<LlamaToken>)>,
    batch: LlamaBatch<'static>,
    step: u64,
    cores: Cores,
    /// The model's sliding attention window; 0 when it has none.
    n_swa: usize,
    disk: Option<PromptCache>,
}

fn context_params(spec: &LoadSpec) -> LlamaContextParams {
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(spec.context_size))
        .with_n_batch(spec.batch)
        .with_n_ubatch(spec.ubatch)
        .with_n_threads(spec.threads)
        .with_n_threads_batch(spec.threads)
}

/// What a saved prefix must have been made with to be restored here:
/// the cache's size and layout (a prefix of a larger cache may not fit).
fn cache_settings(ctx: &LlamaContext) -> String {
    format!("n_ctx={} kv=f16 unified swa_full", ctx.n_ctx())
}

/// Whether sequence `seq` still holds the cells that position `at`
/// attends over: with a sliding window of `n_swa`, the window before it
/// (llama.cpp keeps every position between a sequence's first and last);
/// without one (`n_swa` 0), always.
fn has_window(ctx: &LlamaContext, n_swa: usize, seq: i32, at: usize) -> bool {
    n_swa == 0 || ctx.kv_cache_seq_pos_min(seq) <= at.saturating_sub(n_swa) as i32
}

/// The model's attention window, for models whose layers attend over a
/// sliding window (Gemma 2 and 3, …); 0 for the others.
fn sliding_window(model: &LlamaModel) -> usize {
    let Ok(arch) = model.meta_val_str("general.architecture") else {
        return 0;
    };
    model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()
        .and_then(|w| w.trim().parse().ok())
        .unwrap_or(0)
}

impl<'m> Scheduler<'m> {
    /// Tokens of context a request may have: all of the shared cache.
    fn seq_ctx(&self) -> u32 {
        self.ctx.n_ctx()
    }

    fn new(engine: &'m Engine, spec: &LoadSpec) -> Result<Self, String> {
        let slots = spec.slots.max(1);
        // One cache that the slots share, as llama-server's unified cache:
        // four slots cost what one context does, and a single long
        // conversation still has the whole context. Decodes attend over
        // the cells of every slot (masked), idle prefixes included, which
        // makes prompts read a few per cent slower than a stream per slot.
        // The full-size sliding-window cache (llama.cpp's default here) is
        // what lets a prefix be kept, cut and restored on models such as
        // Gemma 3: a cache of the window alone (llama-server's default)
        // loses the cells before it once it fills, so a prefix could be
        // cut back far less often. It costs those layers a full context
        // (Gemma 3 270M: 1.2x llama-server's memory at 8192). llama.cpp
        // saves a sequence's window cells only, though, so a restored
        // prefix cannot be cut back before its window (see `admit`).
        let params = context_params(spec)
            .with_n_seq_max(slots)
            .with_kv_unified(true)
            .with_swa_full(true);
        let ctx = engine
            .model
            .new_context(&engine.backend, params)
            .map_err(|e| {
                format!(
                    "llama.cpp could not make a context of {} tokens: {e}",
                    spec.context_size
                )
            })?;
        Ok(Scheduler {
            engine,
            embed_ctx: None,
            cores: Cores::open(spec.cores_lock.as_deref()),
            spec: spec.clone(),
            slots: (0..slots)
                .map(|i| Slot {
                    seq: i as i32,
                    cached: Vec::new(),
                    active: None,
                    last_used: 0,
                    hits: 0,
                    prompt_len: 0,
                })
                .collect(),
            queue: VecDeque::new(),
            batch: LlamaBatch::new(spec.batch.max(1) as usize, slots as i32),
            step: 0,
            n_swa: sliding_window(&engine.model),
            disk: spec
                .prompt_cache
                .as_ref()
                .map(|c| PromptCache::open(c, &cache_settings(&ctx))),
            ctx,
        })
    }

    fn loaded(&self, engine: &Engine) -> Loaded {
        let m = &engine.model;
        let vocab = m.vocab();
        let text = |t| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
        Loaded {
            chat_template: m.meta_val_str("tokenizer.chat_template").ok(),
            bos: text(vocab.bos()),
            eos: text(vocab.eos()),
            context_size: self.seq_ctx(),
            context_train: m.n_ctx_train(),
            vocab: m.n_vocab(),
            embedding_length: m.n_embd(),
            params: m.n_params(),
            size: m.size(),
            load_ms: engine.load_ms,
        }
    }

    fn serve(
        &mut self,
        rx: &mpsc::Receiver<Inbound>,
        out: &mut BufWriter<UnixStream>,
    ) -> Result<(), String> {
        let mut events = Vec::new();
        loop {
            let busy = !self.queue.is_empty() || self.slots.iter().any(|s| s.active.is_some());
            let msg = if busy {
                match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return Ok(()),
                }
            };
            if let Some(msg) = msg {
                self.handle(msg, &mut events);
                // Take everything that arrived, then run a step.
                while let Ok(msg) = rx.try_recv() {
                    self.handle(msg, &mut events);
                }
            }
            self.admit(&mut events);
            if self.slots.iter().any(|s| s.active.is_some()) {
                self.run_step(&mut events);
            }
            for ev in events.drain(..) {
                write_frame(out, &ev).map_err(|e| format!("the runner went away: {e}"))?;
            }
        }
    }

    fn handle(&mut self, msg: Inbound, events: &mut Vec<FromWorker>) {
        match msg {
            Inbound::Generate(g, prompt) => self.queue.push_back((g, prompt)),
            Inbound::Cancel(id) => {
                self.queue.retain(|(g, _)| g.id != id);
                for slot in &mut self.slots {
                    if slot.active.as_ref().is_some_and(|a| a.id == id) {
                        finish(slot, Finish::Cancelled, events);
                    }
                }
            }
            Inbound::Embed { id, inputs } => events.push(match self.embed(&inputs) {
                Ok((vectors, tokens)) => FromWorker::Embeddings {
                    id,
                    vectors,
                    tokens,
                },
                Err((status, error)) => FromWorker::Failed { id, status, error },
            }),
            Inbound::Answer(ev) => events.push(ev),
            Inbound::Nothing => {}
        }
    }

    /// Move queued requests into free slots: the idle slot whose cache
    /// shares the longest prefix with the prompt, else the least recently
    /// used one.
    fn admit(&mut self, events: &mut Vec<FromWorker>) {
        while self.slots.iter().any(|s| s.active.is_none()) {
            let Some((g, prompt)) = self.queue.pop_front() else {
                return;
            };
            let n_ctx = self.seq_ctx() as usize;
            if prompt.is_empty() {
                events.push(FromWorker::Failed {
                    id: g.id,
                    status: 400,
                    error: "the prompt is empty".into(),
                });
                continue;
            }
            if prompt.len() >= n_ctx {
                events.push(FromWorker::Failed {
                    id: g.id,
                    status: 400,
                    error: format!(
                        "the prompt is {} tokens, over the context size of {n_ctx}; shorten it or raise the context with `moat model configure --context-size N MODEL`",
                        prompt.len()
                    ),
                });
                continue;
            }
            let sampler = match build_sampler(&self.engine.model, &g.sampling, g.grammar.as_deref())
            {
                Ok(s) => s,
                Err(error) => {
                    events.push(FromWorker::Failed {
                        id: g.id,
                        status: 400,
                        error,
                    });
                    continue;
                }
            };
            let Some(index) = best_slot(&self.slots, &prompt) else {
                return;
            };
            let shared = common_prefix(&self.slots[index].cached, &prompt);
            let shared = self.restore_prefix(index, &prompt, shared);
            let slot = &mut self.slots[index];
            if shared >= prompt_cache::MIN_TOKENS {
                slot.hits += 1;
            } else {
                slot.hits = 0;
            }
            slot.prompt_len = prompt.len();
            // The last prompt token is always decoded again: its logits are
            // where the first new token comes from.
            let mut keep = shared.min(prompt.len() - 1);
            if self
                .ctx
                .kv_cache_seq_rm(slot.seq, Some(keep as u32), None)
                .is_err()
            {
                // Recurrent models cannot drop a tail: start the slot afresh.
                let _ = self.ctx.kv_cache_seq_rm(slot.seq, None, None);
                keep = 0;
            }
            // A prefix whose window is gone (a restored one has only the
            // window of its end; a full cache reuses the oldest cells) is
            // read again, as llama-server does.
            if keep > 0 && !has_window(&self.ctx, self.n_swa, slot.seq, keep) {
                let _ = self.ctx.kv_cache_seq_rm(slot.seq, None, None);
                keep = 0;
            }
            slot.cached.truncate(keep);
            let room = (n_ctx - prompt.len()) as u32;
            slot.active = Some(Active {
                id: g.id,
                cache_n: keep as u32,
                max_tokens: g.max_tokens.map_or(room, |m| m.min(room)),
                prompt,
                sampler,
                generated: 0,
                ignore_eos: g.ignore_eos,
                special: g.special,
                text: TextOut::new(g.stop),
                stop_word: None,
                next: None,
                logits_at: None,
                started: Instant::now(),
                prompt_done: None,
            });
        }
    }

    /// One decode over every active slot; on a full cache, free the idle
    /// slots' caches, and if that is not enough, fail the newest request.
    fn run_step(&mut self, events: &mut Vec<FromWorker>) {
        self.step += 1;
        loop {
            let added = self.fill_batch();
            let (ctx, batch) = (&mut self.ctx, &mut self.batch);
            match self.cores.turn(|| ctx.decode(batch)) {
                Ok(()) => {
                    for (index, n) in added {
                        let slot = &mut self.slots[index];
                        if let Some(a) = &slot.active {
                            let start = slot.cached.len();
                            let toks: Vec<LlamaToken> = if a.prefilling(start) {
                                a.prompt[start..start + n].to_vec()
                            } else {
                                a.next.into_iter().collect()
                            };
                            slot.cached.extend(toks);
                        }
                    }
                    break;
                }
                Err(DecodeError::NoKvCacheSlot) => {
                    if self.evict_idle() {
                        continue;
                    }
                    let newest = self
                        .slots
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| s.active.as_ref().map(|a| (a.started, i)))
                        .max();
                    if let Some((_, i)) = newest {
                        let n_ctx = self.seq_ctx();
                        let slot = &mut self.slots[i];
                        if let Some(a) = slot.active.take() {
                            events.push(FromWorker::Failed {
                                id: a.id,
                                status: 503,
                                error: format!("the context of {n_ctx} tokens is full with the requests in flight; retry, or raise it with `moat model configure --context-size N MODEL`"),
                            });
                        }
                        let _ = self.ctx.kv_cache_seq_rm(slot.seq, None, None);
                        slot.cached.clear();
                    }
                    if !self.slots.iter().any(|s| s.active.is_some()) {
                        return;
                    }
                }
                Err(e) => {
                    for slot in &mut self.slots {
                        if let Some(a) = slot.active.take() {
                            events.push(FromWorker::Failed {
                                id: a.id,
                                status: 500,
                                error: format!("llama.cpp failed to decode: {e}"),
                            });
                        }
                        let _ = self.ctx.kv_cache_seq_rm(slot.seq, None, None);
                        slot.cached.clear();
                    }
                    return;
                }
            }
        }
        self.sample_all(events);
    }

    /// Put the next tokens of every active slot into the batch; returns
    /// (slot, tokens added) for each.
    fn fill_batch(&mut self) -> Vec<(usize, usize)> {
        self.batch.clear();
        // One micro-batch a step, even for a prompt read alone: a request
        // that arrives meanwhile (and every stream's next token) waits for
        // one short step, not for a long prompt's whole batch. llama.cpp
        // splits a batch into micro-batches anyway, so reading a prompt
        // this way costs only a call per micro-batch.
        let mut budget = self.spec.ubatch.min(self.spec.batch).max(1) as usize;
        let mut added = Vec::new();
        // Generating slots first: one token each keeps every stream moving
        // while long prompts are read in chunks beside them.
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            a.logits_at = None;
            if a.prefilling(slot.cached.len()) || budget == 0 {
                continue;
            }
            if let Some(tok) = a.next {
                let pos = slot.cached.len() as i32;
                if self.batch.add(tok, pos, &[slot.seq], true).is_ok() {
                    a.logits_at = Some(self.batch.n_tokens() - 1);
                    added.push((index, 1));
                    budget -= 1;
                }
            }
        }
        for index in prefill_order(&self.slots) {
            let slot = &mut self.slots[index];
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            let start = slot.cached.len();
            if budget == 0 {
                break;
            }
            let n = (a.prompt.len() - start).min(budget);
            let last = start + n == a.prompt.len();
            let mut ok = 0;
            for (k, tok) in a.prompt[start..start + n].iter().enumerate() {
                let logits = last && k == n - 1;
                if self
                    .batch
                    .add(*tok, (start + k) as i32, &[slot.seq], logits)
                    .is_err()
                {
                    break;
                }
                ok += 1;
            }
            if last && ok == n {
                a.logits_at = Some(self.batch.n_tokens() - 1);
            }
            budget -= ok;
            added.push((index, ok));
        }
        added
    }

    fn sample_all(&mut self, events: &mut Vec<FromWorker>) {
        let vocab = self.engine.model.vocab();
        let step = self.step;
        for slot in &mut self.slots {
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            let Some(at) = a.logits_at.take() else {
                continue;
            };
            slot.last_used = step;
            if a.prompt_done.is_none() {
                a.prompt_done = Some(Instant::now());
            }
            let tok = a.sampler.sample(&self.ctx, at);
            if vocab.is_eog(tok) && !a.ignore_eos {
                finish(slot, Finish::Stop, events);
                continue;
            }
            a.generated += 1;
            let piece = vocab.token_to_piece(tok, a.special, None);
            match a.text.push(&piece) {
                Step::Stop(text, word) => {
                    if !text.is_empty() {
                        events.push(FromWorker::Piece { id: a.id, text });
                    }
                    a.stop_word = Some(word);
                    finish(slot, Finish::Stop, events);
                    continue;
                }
                Step::Emit(text) if !text.is_empty() => {
                    events.push(FromWorker::Piece { id: a.id, text })
                }
                Step::Emit(_) => {}
            }
            if a.generated >= a.max_tokens {
                finish(slot, Finish::Length, events);
            } else {
                a.next = Some(tok);
            }
        }
    }

    /// When a saved prefix shares more of `prompt` than slot `index`
    /// holds (by enough to be worth a read), restore it into the slot;
    /// returns how much of the prompt the slot's cache then starts with.
    fn restore_prefix(&mut self, index: usize, prompt: &[LlamaToken], shared: usize) -> usize {
        let Some(disk) = self.disk.as_mut() else {
            return shared;
        };
        let ids: Vec<i32> = prompt.iter().map(|t| t.0).collect();
        let Some((entry, saved)) = disk.best(&ids) else {
            return shared;
        };
        if saved < shared + prompt_cache::MIN_TOKENS {
            return shared;
        }
        let Some(payload) = disk.payload(entry) else {
            return shared;
        };
        let tokens: Vec<LlamaToken> = disk.entries()[entry]
            .tokens
            .iter()
            .map(|&t| LlamaToken(t))
            .collect();
        let seq = self.slots[index].seq;
        let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
        self.slots[index].cached.clear();
        // Room for it may have to come from the idle slots' prefixes.
        // SAFETY: the payload is what llama.cpp's `state_seq_get_data`
        // wrote for this model, build and cache layout, checked against
        // its SHA-256 before it got here (`PromptCache::payload`).
        while !unsafe {
            self.ctx
                .state_seq_set_data_ext(&payload, seq, LlamaStateSeqFlags::empty())
        } {
            if !self.evict_idle() {
                let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
                let busy = self.slots.iter().any(|s| s.active.is_some());
                if let Some(disk) = self.disk.as_mut() {
                    if busy {
                        eprintln!(
                            "moat model worker: prompt cache: no room beside the requests in flight to restore {} tokens; the prompt is read instead",
                            tokens.len()
                        );
                    } else {
                        // Room was not what failed: llama.cpp refused it.
                        disk.forget(entry, "llama.cpp could not restore it");
                    }
                }
                return 0;
            }
        }
        let shared = common_prefix(&tokens, prompt);
        self.slots[index].cached = tokens;
        shared
    }

    /// Save the prefixes of the slots worth it to the prompt cache: those
    /// most reused first, none that another saved one starts with, within
    /// the cache's bound. A save that fails (a full disk) is dropped.
    fn save_prefixes(&mut self) {
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].cached.len() >= prompt_cache::MIN_TOKENS)
            .collect();
        order.sort_by_key(|&i| {
            let s = &self.slots[i];
            (std::cmp::Reverse(s.hits), std::cmp::Reverse(s.last_used))
        });
        // A sliding-window model's prefix is saved where its last prompt
        // ended (before its last token, which a request decodes again):
        // only the window of the end is saved, so a later request can go
        // on from there but not from before it, and the same prompt again
        // (an agent's first turn) must not have to cut the answer off.
        if self.n_swa > 0 {
            for &i in &order {
                let slot = &mut self.slots[i];
                let end = slot.prompt_len.saturating_sub(1);
                if end < slot.cached.len()
                    && end >= prompt_cache::MIN_TOKENS
                    && has_window(&self.ctx, self.n_swa, slot.seq, end)
                    && self
                        .ctx
                        .kv_cache_seq_rm(slot.seq, Some(end as u32), None)
                        .is_ok()
                {
                    slot.cached.truncate(end);
                }
            }
        }
        let mut saved = 0;
        // The least valuable first: the most valuable is then the most
        // recently used file, the last the cache's bound evicts.
        for (k, &i) in order.iter().enumerate().rev() {
            let slot = &self.slots[i];
            let covered = order.iter().enumerate().any(|(j, &o)| {
                let other = &self.slots[o].cached;
                j != k
                    && other.len() >= slot.cached.len()
                    && other.starts_with(&slot.cached)
                    && (other.len() > slot.cached.len() || j < k)
            });
            if covered {
                continue;
            }
            let size = self
                .ctx
                .state_seq_get_size_ext(slot.seq, LlamaStateSeqFlags::empty());
            let mut payload = vec![0u8; size];
            // SAFETY: the buffer has the size llama.cpp just reported for
            // this sequence, and nothing changes the cache in between.
            let n = unsafe {
                self.ctx.state_seq_get_data_ext(
                    payload.as_mut_ptr(),
                    slot.seq,
                    LlamaStateSeqFlags::empty(),
                )
            };
            if n != size {
                eprintln!("moat model worker: prompt cache: llama.cpp wrote {n} bytes of a state of {size}; not saved");
                continue;
            }
            let tokens: Vec<i32> = slot.cached.iter().map(|t| t.0).collect();
            match disk.save(&tokens, &payload) {
                Ok(true) => saved += 1,
                Ok(false) => {}
                Err(e) => {
                    eprintln!("moat model worker: {e}; the unload goes on without it");
                    break;
                }
            }
        }
        let total = disk.evict();
        if saved > 0 {
            eprintln!(
                "moat model worker: prompt cache: saved {saved} prefixes; the cache holds {:.1} MiB",
                total as f64 / f64::from(1 << 20)
            );
        }
    }

    /// Drop the cached prefixes of idle slots, least recently used first;
    /// false when there were none to drop.
    fn evict_idle(&mut self) -> bool {
        let victim = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none() && !s.cached.is_empty())
            .min_by_key(|(_, s)| s.last_used)
            .map(|(i, _)| i);
        let Some(i) = victim else { return false };
        let seq = self.slots[i].seq;
        let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
        self.slots[i].cached.clear();
        self.slots[i].hits = 0;
        true
    }

    /// Mean-pooled, normalised embeddings from a second context made on
    /// first use (its cache is separate from the generating slots').
    fn embed(&mut self, tokenized: &[Vec<LlamaToken>]) -> Result<Embedded, (u16, String)> {
        if self.embed_ctx.is_none() {
            let params = context_params(&self.spec)
                .with_n_ubatch(self.spec.batch)
                .with_embeddings(true)
                .with_pooling_type(LlamaPoolingType::Mean);
            let ctx = self
                .engine
                .model
                .new_context(&self.engine.backend, params)
                .map_err(|e| {
                    (
                        500,
                        format!("llama.cpp could not make an embedding context: {e}"),
                    )
                })?;
            self.embed_ctx = Some(ctx);
        }
        let Some(ctx) = self.embed_ctx.as_mut() else {
            return Err((500, "no embedding context".into()));
        };
        let limit = (self.spec.batch as usize).min(ctx.n_ctx() as usize);
        let mut vectors = Vec::new();
        let mut total = 0u32;
        for tokens in tokenized {
            if tokens.is_empty() {
                return Err((400, "an input to embed is empty".into()));
            }
            if tokens.len() > limit {
                return Err((
                    400,
                    format!(
                        "an input is {} tokens, over the embedding limit of {limit}",
                        tokens.len()
                    ),
                ));
            }
            total += tokens.len() as u32;
            let _ = ctx.kv_cache_seq_rm(0, None, None);
            let mut batch = LlamaBatch::new(tokens.len(), 1);
            batch
                .add_sequence(tokens, 0, true)
                .map_err(|e| (500, e.to_string()))?;
            self.cores
                .turn(|| ctx.decode(&mut batch))
                .map_err(|e| (500, format!("llama.cpp failed to embed: {e}")))?;
            let v = ctx
                .embeddings_seq_ith(0)
                .map_err(|e| (500, e.to_string()))?;
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            vectors.push(v.iter().map(|x| x / norm).collect());
        }
        Ok((vectors, total))
    }
}

/// Embedding vectors and the tokens they took.
type Embedded = (Vec<Vec<f32>>, u32);

fn finish(slot: &mut Slot, why: Finish, events: &mut Vec<FromWorker>) {
    let Some(mut a) = slot.active.take() else {
        return;
    };
    let rest = a.text.finish();
    if !rest.is_empty() && why != Finish::Cancelled {
        events.push(FromWorker::Piece {
            id: a.id,
            text: rest,
        });
    }
    let now = Instant::now();
    let prompt_done = a.prompt_done.unwrap_or(now);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let prompt_n = a.prompt.len() as u32 - a.cache_n;
    events.push(FromWorker::Done {
        id: a.id,
        finish: why,
        prompt_tokens: a.prompt.len() as u32,
        completion_tokens: a.generated,
        timings: Timings::new(
            a.cache_n,
            prompt_n,
            ms(prompt_done - a.started),
            a.generated,
            ms(now - prompt_done),
        ),
        stop_word: a.stop_word,
    });
}

/// The idle slot to serve `prompt`: longest cached prefix, then least
/// recently used.
fn best_slot(slots: &[Slot], prompt: &[LlamaToken]) -> Option<usize> {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.active.is_none())
        .max_by_key(|(_, s)| {
            (
                common_prefix(&s.cached, prompt),
                std::cmp::Reverse(s.last_used),
            )
        })
        .map(|(i, _)| i)
}

/// The slots still reading their prompts, the least left to read first: a
/// short request gets its first token in the next step however long the
/// prompts beside it, and a long one still gets what the step has left.
fn prefill_order(slots: &[Slot]) -> Vec<usize> {
    let mut order: Vec<(usize, usize)> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let a = s.active.as_ref()?;
            let left = a.prompt.len().saturating_sub(s.cached.len());
            (left > 0).then_some((left, i))
        })
        .collect();
    order.sort_unstable();
    order.into_iter().map(|(_, i)| i).collect()
}

/// How many leading items `a` and `b` share.
pub(super) fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn build_sampler(
    model: &LlamaModel,
    s: &Sampling,
    grammar: Option<&str>,
) -> Result<LlamaSampler, String> {
    let mut chain = Vec::new();
    if let Some(g) = grammar {
        chain.push(
            LlamaSampler::grammar(model, g, "root")
                .map_err(|e| format!("llama.cpp refused the grammar: {e}"))?,
        );
    }
    if s.repeat_penalty != 1.0 || s.presence_penalty != 0.0 || s.frequency_penalty != 0.0 {
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            s.repeat_last_n,
            s.repeat_penalty,
            s.frequency_penalty,
            s.presence_penalty,
        ));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        chain.push(LlamaSampler::dist(s.seed.unwrap_or_else(rand_seed)));
    }
    Ok(LlamaSampler::chain_simple(chain))
}

fn rand_seed() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ std::process::id()
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_counts_equal_leading_items() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix::<i32>(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2]), 2);
    }
}

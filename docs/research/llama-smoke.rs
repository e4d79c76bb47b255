// A scratch program that validated the llama-cpp-2 =0.1.160 API on SmolLM2-135M (load,
// tokenize, batch decode, greedy sampling): built in 7m50s on 2 busy cores, 12 tokens
// at 18-36 tok/s while CI ran beside it. Kept as a reference for the engine.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: i32 = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(2);
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let backend = LlamaBackend::init().unwrap();
    let t = Instant::now();
    let model = LlamaModel::load_from_file(&backend, &args[1], &LlamaModelParams::default()).unwrap();
    eprintln!("load {:?} ctx_train {} template {:?}", t.elapsed(), model.n_ctx_train(), model.meta_val_str("tokenizer.chat_template").map(|s| s.len()));
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(2048))
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(&backend, params).unwrap();
    let vocab = model.vocab();
    let prompt = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n";
    let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
    let mut batch = LlamaBatch::new(512, 1);
    let last = tokens.len() - 1;
    for (i, tok) in tokens.iter().enumerate() {
        batch.add(*tok, i as i32, &[0], i == last).unwrap();
    }
    let t = Instant::now();
    ctx.decode(&mut batch).unwrap();
    eprintln!("prompt {} tokens in {:?}", tokens.len(), t.elapsed());
    let mut sampler = LlamaSampler::chain_simple([LlamaSampler::temp(0.0), LlamaSampler::greedy()]);
    let mut pos = tokens.len() as i32;
    let mut out = Vec::new();
    let t = Instant::now();
    let mut n = 0;
    let mut idx = batch.n_tokens() - 1;
    for _ in 0..64 {
        let tok = sampler.sample(&ctx, idx);
        if vocab.is_eog(tok) { break; }
        out.extend(vocab.token_to_piece(tok, false, None));
        batch.clear();
        batch.add(tok, pos, &[0], true).unwrap();
        pos += 1;
        n += 1;
        ctx.decode(&mut batch).unwrap();
        idx = 0;
    }
    let el = t.elapsed();
    println!("{}", String::from_utf8_lossy(&out));
    eprintln!("{n} tokens in {el:?}: {:.1} tok/s", n as f64 / el.as_secs_f64());
}

//! Drive the engine without the daemon: `engine_smoke MODEL.gguf [N]` starts
//! a worker (this same binary in the worker role), sends N concurrent
//! generations and prints what came back with the timings.

use std::sync::Arc;
use std::time::Instant;

use moat_models::engine::{FromWorker, Generate, ModelToLoad, Runner, RunnerConfig, Sampling};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(moat_models::engine::ROLE) {
        std::process::exit(moat_models::engine::worker_main());
    }
    let Some(path) = args.get(1) else {
        eprintln!("usage: engine_smoke MODEL.gguf [streams]");
        std::process::exit(2);
    };
    let streams: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1);
    let exe = std::env::current_exe().unwrap_or_default();
    let runner = Runner::new(RunnerConfig::for_host(
        exe,
        std::env::temp_dir().join("moat-engine-smoke"),
    ));
    let model = ModelToLoad {
        id: "smoke".into(),
        name: "smoke".into(),
        gguf: vec![path.into()],
        context_size: None,
        context_train: None,
        weights_bytes: 0,
        kv_bytes_per_token: 0,
    };
    let t = Instant::now();
    let worker = match runner.worker(&model, None) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "loaded in {:?} (worker says {:.0} ms)",
        t.elapsed(),
        worker.loaded.load_ms
    );
    let t = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|i| {
            let worker = Arc::clone(&worker);
            std::thread::spawn(move || {
                let prompt = format!("<|im_start|>user\nWrite a haiku about the number {i}.<|im_end|>\n<|im_start|>assistant\n");
                let mut req = match worker.generate(Generate {
                    id: 0,
                    prompt,
                    max_tokens: Some(64),
                    stop: vec![],
                    sampling: Sampling { temperature: 0.0, ..Sampling::default() },
                    grammar: None,
                    ignore_eos: false,
                    special: false,
                }) {
                    Ok(r) => r,
                    Err(e) => return format!("{i}: {e}"),
                };
                let mut text = String::new();
                while let Some(ev) = req.blocking_next() {
                    match ev {
                        FromWorker::Piece { text: t, .. } => text.push_str(&t),
                        FromWorker::Done { timings, finish, .. } => {
                            return format!("{i}: {finish:?} {:.1} tok/s prompt {:.0} tok/s: {text:?}", timings.predicted_per_second, timings.prompt_per_second)
                        }
                        FromWorker::Failed { error, .. } => return format!("{i}: failed: {error}"),
                        _ => {}
                    }
                }
                format!("{i}: no end")
            })
        })
        .collect();
    for h in handles {
        println!("{}", h.join().unwrap_or_default());
    }
    eprintln!("all in {:?}", t.elapsed());
}

//! Prometheus metrics under llama-server's names (`llamacpp:…`), with a
//! `model` label since one runner serves several models.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use http::{header, HeaderValue, Response, StatusCode};

use super::http::{full, Body};
use crate::engine::{LoadedModel, Timings};

#[derive(Debug, Default, Clone)]
struct Counters {
    prompt_tokens: u64,
    prompt_seconds: f64,
    predicted_tokens: u64,
    predicted_seconds: f64,
    requests: u64,
    processing: i64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    by_model: Mutex<BTreeMap<String, Counters>>,
}

impl Metrics {
    fn with(&self, model: &str, f: impl FnOnce(&mut Counters)) {
        let mut all = self.by_model.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(model.to_string()).or_default());
    }

    pub fn started(&self, model: &str) {
        self.with(model, |c| {
            c.requests += 1;
            c.processing += 1;
        });
    }

    /// A request ended; `done` carries its counts when it completed.
    pub fn finished(&self, model: &str, done: Option<(u32, u32, &Timings)>) {
        self.with(model, |c| {
            c.processing -= 1;
            if let Some((_, _, t)) = done {
                c.prompt_tokens += u64::from(t.prompt_n);
                c.prompt_seconds += t.prompt_ms / 1e3;
                c.predicted_tokens += u64::from(t.predicted_n);
                c.predicted_seconds += t.predicted_ms / 1e3;
            }
        });
    }

    pub fn render(&self, loaded: &[LoadedModel]) -> Response<Body> {
        let all = self
            .by_model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = String::new();
        let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        type Series<'a> = (&'a str, &'a str, &'a str, &'a dyn Fn(&Counters) -> f64);
        let series: [Series; 7] = [
            (
                "prompt_tokens_total",
                "counter",
                "Number of prompt tokens processed.",
                &|c| c.prompt_tokens as f64,
            ),
            (
                "prompt_seconds_total",
                "counter",
                "Prompt process time",
                &|c| c.prompt_seconds,
            ),
            (
                "tokens_predicted_total",
                "counter",
                "Number of generation tokens processed.",
                &|c| c.predicted_tokens as f64,
            ),
            (
                "tokens_predicted_seconds_total",
                "counter",
                "Predict process time",
                &|c| c.predicted_seconds,
            ),
            (
                "prompt_tokens_seconds",
                "gauge",
                "Average prompt throughput in tokens/s.",
                &|c| rate(c.prompt_tokens, c.prompt_seconds),
            ),
            (
                "predicted_tokens_seconds",
                "gauge",
                "Average generation throughput in tokens/s.",
                &|c| rate(c.predicted_tokens, c.predicted_seconds),
            ),
            (
                "requests_processing",
                "gauge",
                "Number of requests processing.",
                &|c| c.processing.max(0) as f64,
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(
                out,
                "# HELP llamacpp:{name} {help}\n# TYPE llamacpp:{name} {kind}"
            );
            for (model, c) in &all {
                let _ = writeln!(
                    out,
                    "llamacpp:{name}{{model=\"{}\"}} {}",
                    escape(model),
                    value(c)
                );
            }
        }
        let _ = writeln!(out, "# HELP moat:model_loaded Whether a model is loaded, with its resident estimate in bytes.\n# TYPE moat:model_loaded gauge");
        for m in loaded {
            let _ = writeln!(
                out,
                "moat:model_loaded{{model=\"{}\"}} {}",
                escape(&m.name),
                m.memory
            );
        }
        let mut resp = Response::new(full(out));
        *resp.status_mut() = StatusCode::OK;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        resp
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

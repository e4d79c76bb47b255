//! `moat model run | ps | unload | configure | status | logs`: the commands
//! about running models rather than storing them. `run` with a prompt
//! prints the answer as it streams; without one (on a terminal) it is a
//! chat that keeps the conversation, as `docker model run` does.

use std::io::{BufRead, IsTerminal, Read, Write};

use anyhow::{bail, Result};
use moat_api::{ModelChatRequest, Request};

use crate::client::{call, Call};
use crate::output::{human_size, table};

pub fn run(model: &str, prompt: Vec<String>, detach: bool) -> Result<i32> {
    if detach {
        let v: serde_json::Value = call(&Request::ModelChat(ModelChatRequest {
            model: model.to_string(),
            ..Default::default()
        }))?;
        println!("Loaded {model} (worker pid {})", v["pid"]);
        return Ok(0);
    }
    let mut prompt = prompt.join(" ");
    if prompt.is_empty() && !std::io::stdin().is_terminal() {
        std::io::stdin().read_to_string(&mut prompt)?;
    }
    if !prompt.trim().is_empty() {
        turn(model, &[("user".into(), prompt)])?;
        return Ok(0);
    }
    chat(model)
}

/// One exchange: streams the answer to stdout, returns it.
fn turn(model: &str, messages: &[(String, String)]) -> Result<String> {
    let call = Call::start(
        &Request::ModelChat(ModelChatRequest {
            model: model.to_string(),
            messages: messages.to_vec(),
            max_tokens: None,
        }),
        &[],
    )?;
    let mut answer = String::new();
    loop {
        match call.next()?.0 {
            moat_api::Reply::Text { text } => {
                print!("{text}");
                std::io::stdout().flush()?;
                answer.push_str(&text);
            }
            moat_api::Reply::Ok { .. } => break,
            moat_api::Reply::Error { message } => bail!("{message}"),
            moat_api::Reply::Progress { .. } | moat_api::Reply::Warning { .. } => {}
            other => bail!("unexpected reply from the daemon: {other:?}"),
        }
    }
    println!();
    Ok(answer)
}

/// The interactive chat: each line is a turn; `/bye` or end of input ends it.
fn chat(model: &str) -> Result<i32> {
    eprintln!("Interactive chat with {model}; /bye or Ctrl-D to leave.");
    let mut messages: Vec<(String, String)> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        if line == "/bye" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        messages.push(("user".into(), line.to_string()));
        match turn(model, &messages) {
            Ok(answer) => messages.push(("assistant".into(), answer)),
            Err(e) => {
                eprintln!("moat: {e:#}");
                messages.pop();
            }
        }
    }
    Ok(0)
}

pub fn ps(json: bool) -> Result<i32> {
    let loaded: serde_json::Value = call(&Request::ModelPs)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&loaded)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = loaded
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let keep = match m["keep_alive"].as_object() {
                Some(d) => format!("{}s", d.get("secs").and_then(|s| s.as_u64()).unwrap_or(0)),
                None => "forever".into(),
            };
            vec![
                m["name"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches("ai/")
                    .to_string(),
                m["pid"].to_string(),
                m["context_size"].to_string(),
                human_size(m["memory"].as_u64().unwrap_or(0)),
                m["in_flight"].to_string(),
                keep,
            ]
        })
        .collect();
    table(
        &[
            "MODEL NAME",
            "PID",
            "CONTEXT",
            "MEMORY",
            "IN FLIGHT",
            "KEEP ALIVE",
        ],
        &rows,
    );
    Ok(0)
}

pub fn unload(models: Vec<String>, all: bool) -> Result<i32> {
    if models.is_empty() && !all {
        bail!("name the models to unload, or give --all");
    }
    let v: serde_json::Value = call(&Request::ModelUnload { models, all })?;
    println!("Unloaded {} model(s)", v["unloaded_runners"]);
    Ok(0)
}

/// `moat model configure`: `request` is a `Request::ModelConfigure`.
pub fn configure(request: Request) -> Result<i32> {
    if let Request::ModelConfigure {
        model,
        context_size: None,
        keep_alive: None,
        temperature: None,
        seed: None,
        max_tokens: None,
    } = &request
    {
        bail!("give one or more of --context-size N, --keep-alive DURATION, --temperature T, --seed N, --max-tokens N for {model}");
    }
    let v: serde_json::Value = call(&request)?;
    if let Request::ModelConfigure { model, .. } = &request {
        println!("Configured {model}: {v}");
    }
    Ok(0)
}

pub fn status(json: bool) -> Result<i32> {
    let v: serde_json::Value = call(&Request::ModelStatus)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    match v["error"].as_str() {
        None => println!(
            "Model runner is running at {}",
            v["endpoint"].as_str().unwrap_or_default()
        ),
        Some(why) => {
            println!("Model runner is not on the host's loopback: {why} (sandboxes still reach it)")
        }
    }
    println!(
        "llama.cpp: {} threads, {} slots, context {} by default, keep-alive {}",
        v["threads"],
        v["slots"],
        v["context_size"],
        v["keep_alive"].as_str().unwrap_or_default()
    );
    let loaded = v["loaded"].as_array().map_or(0, Vec::len);
    println!(
        "{loaded} model(s) loaded; logs in {}",
        v["logs"].as_str().unwrap_or_default()
    );
    Ok(0)
}

pub fn logs(model: Option<String>, follow: bool) -> Result<i32> {
    let v: serde_json::Value = call(&Request::ModelLogs {
        model: model.clone(),
    })?;
    let path = std::path::PathBuf::from(v["path"].as_str().unwrap_or_default());
    if model.is_none() {
        println!("{}", path.display());
        return Ok(0);
    }
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("no log yet: the model has not been loaded");
            return Ok(0);
        }
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let mut out = std::io::stdout();
    std::io::copy(&mut file, &mut out)?;
    if !follow {
        return Ok(0);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::io::copy(&mut file, &mut out)?;
        out.flush()?;
    }
}

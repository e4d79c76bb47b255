//! `moat model …`, mirroring `docker model …`: the same subcommands, flags,
//! columns and JSON. Each command is one request to the daemon, which owns
//! the model store; this module only parses, opens the files the user
//! named (they travel to the daemon as descriptors) and prints. New
//! subcommands are a variant of [`ModelCmd`] and an arm of [`run`].

use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use moat_api::{ModelDiskUsage, ModelInfo, ModelPackageRequest, ModelRemoved, Request};
use moat_models::store::ModelConfig;

use crate::client::{call, call_with_fds};
use crate::output::{human_size, table};

#[derive(Subcommand)]
pub enum CacheCmd {
    /// Remove the saved prompts of MODEL, or of every model
    Rm { model: Option<String> },
}

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Package GGUF files (one, or every shard of a split model) as a model
    Package {
        /// A GGUF file; repeat for every shard of a split model
        #[arg(long = "gguf", required = true, value_name = "FILE")]
        gguf: Vec<String>,
        /// A license file to ship with the model; may be repeated
        #[arg(long = "license", value_name = "FILE")]
        license: Vec<String>,
        /// The context size, in tokens, to run the model with
        #[arg(long = "context-size", value_name = "TOKENS")]
        context_size: Option<u64>,
        /// A Jinja chat template to use instead of the GGUF's own
        #[arg(long = "chat-template", value_name = "FILE")]
        chat_template: Option<String>,
        /// The model's name, e.g. ai/smollm2:135M-Q4_1
        reference: String,
    },
    /// List the models in the store
    #[command(alias = "list")]
    Ls {
        /// DMR's JSON
        #[arg(long)]
        json: bool,
        /// OpenAI's model list
        #[arg(long)]
        openai: bool,
        /// Only the model IDs
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show a model as JSON
    Inspect {
        /// OpenAI's model object
        #[arg(long)]
        openai: bool,
        reference: String,
    },
    /// Remove models (a tag at a time; an ID with --force takes every tag)
    #[command(alias = "remove")]
    Rm {
        /// Remove a model by ID even when several tags name it
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Give a model another name: SOURCE TARGET
    Tag { source: String, target: String },
    /// Push a model to the registry its name starts with (Docker Hub when none)
    Push { reference: String },
    /// Pull a model from the registry its name starts with (Docker Hub when none)
    Pull { reference: String },
    /// Show the disk space models and the prompt cache take
    Df,
    /// The prompt cache: prompts' KV state saved when a model unloads
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// Run a model: answer PROMPT, or chat interactively without one
    Run {
        /// Only load the model and return (it stays loaded for its keep-alive)
        #[arg(short, long)]
        detach: bool,
        model: String,
        /// The prompt; read from stdin when it is not a terminal and none is given
        prompt: Vec<String>,
    },
    /// List the models loaded now
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Unload models from memory
    Unload {
        #[arg(long)]
        all: bool,
        models: Vec<String>,
    },
    /// Set how a model runs: its context size, keep-alive and sampling
    Configure {
        #[arg(long = "context-size", value_name = "TOKENS")]
        context_size: Option<u32>,
        /// "5m", "0" (unload at once), "-1" (keep loaded)
        #[arg(
            long = "keep-alive",
            value_name = "DURATION",
            allow_hyphen_values = true
        )]
        keep_alive: Option<String>,
        /// Sample every request at this temperature, whatever its client
        /// asks (0 to 2; 0: greedy, the same answer every time)
        #[arg(long, value_name = "T", allow_negative_numbers = true)]
        temperature: Option<f32>,
        /// Seed every request's sampler with this, whatever its client asks
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        seed: Option<u32>,
        /// Cut every answer off at this many tokens, whatever its client asks
        #[arg(long = "max-tokens", value_name = "N")]
        max_tokens: Option<u32>,
        model: String,
    },
    /// Show whether the model runner runs, where, and with what settings
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Show a model's log (its worker's output), or the runner's log folder
    Logs {
        /// Keep printing as the log grows
        #[arg(short, long)]
        follow: bool,
        model: Option<String>,
    },
}

pub fn run(cmd: ModelCmd) -> Result<i32> {
    match cmd {
        ModelCmd::Package {
            gguf,
            license,
            context_size,
            chat_template,
            reference,
        } => package(gguf, license, context_size, chat_template, reference),
        ModelCmd::Ls {
            json,
            openai,
            quiet,
        } => {
            let models: Vec<ModelInfo> = call(&Request::ModelList)?;
            if json {
                let shown: Vec<Dmr<'_>> = models.iter().map(dmr).collect();
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else if openai {
                let data: Vec<serde_json::Value> = models.iter().map(openai_model).collect();
                let list = serde_json::json!({"object": "list", "data": data});
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if quiet {
                models.iter().for_each(|m| println!("{}", short_id(&m.id)));
            } else {
                print_table(&models, now());
            }
            Ok(0)
        }
        ModelCmd::Inspect { openai, reference } => {
            let model: ModelInfo = call(&Request::ModelInspect { reference })?;
            let shown = if openai {
                serde_json::to_string_pretty(&openai_model(&model))?
            } else {
                serde_json::to_string_pretty(&dmr(&model))?
            };
            println!("{shown}");
            Ok(0)
        }
        ModelCmd::Rm { force, references } => {
            let mut failed = false;
            for reference in references {
                match call::<ModelRemoved>(&Request::ModelRm { reference, force }) {
                    Ok(removed) => {
                        for tag in &removed.untagged {
                            println!("Untagged: {tag}");
                        }
                        if let Some(id) = &removed.deleted {
                            println!("Deleted: {id}");
                        }
                    }
                    Err(e) => {
                        eprintln!("moat: {e:#}");
                        failed = true;
                    }
                }
            }
            Ok(if failed { 1 } else { 0 })
        }
        ModelCmd::Tag { source, target } => {
            let model: ModelInfo = call(&Request::ModelTag {
                source: source.clone(),
                target,
            })?;
            // The tag just given is the model's last.
            let target = model.tags.last().cloned().unwrap_or_default();
            println!("Tagged {source} ({}) as {target}", short_id(&model.id));
            Ok(0)
        }
        ModelCmd::Push { reference } => {
            let summary: serde_json::Value = call(&Request::ModelPush {
                reference: reference.clone(),
            })?;
            crate::output::print_pushed(&reference, &summary);
            Ok(0)
        }
        ModelCmd::Pull { reference } => {
            let model: ModelInfo = call(&Request::ModelPull { reference })?;
            println!(
                "Pulled {} ({})",
                model.tags.last().cloned().unwrap_or_default(),
                model.id
            );
            Ok(0)
        }
        ModelCmd::Run {
            detach,
            model,
            prompt,
        } => crate::model_run::run(&model, prompt, detach),
        ModelCmd::Ps { json } => crate::model_run::ps(json),
        ModelCmd::Unload { all, models } => crate::model_run::unload(models, all),
        ModelCmd::Configure {
            context_size,
            keep_alive,
            temperature,
            seed,
            max_tokens,
            model,
        } => crate::model_run::configure(Request::ModelConfigure {
            model,
            context_size,
            keep_alive,
            temperature,
            seed,
            max_tokens,
        }),
        ModelCmd::Status { json } => crate::model_run::status(json),
        ModelCmd::Logs { follow, model } => crate::model_run::logs(model, follow),
        ModelCmd::Df => {
            let usage: ModelDiskUsage = call(&Request::ModelDf)?;
            table(
                &["TYPE", "SIZE"],
                &[
                    vec!["Models".into(), human_size(usage.models_disk_usage)],
                    vec![
                        "Prompt cache".into(),
                        human_size(usage.prompt_cache_disk_usage),
                    ],
                ],
            );
            Ok(0)
        }
        ModelCmd::Cache {
            cmd: CacheCmd::Rm { model },
        } => {
            let v: serde_json::Value = call(&Request::ModelCacheRm {
                model: model.clone(),
            })?;
            let freed = v["freed"].as_u64().unwrap_or(0);
            match model {
                Some(m) => println!("Removed the prompt cache of {m} ({})", human_size(freed)),
                None => println!("Removed the prompt cache ({})", human_size(freed)),
            }
            Ok(0)
        }
    }
}

fn package(
    gguf: Vec<String>,
    license: Vec<String>,
    context_size: Option<u64>,
    chat_template: Option<String>,
    reference: String,
) -> Result<i32> {
    let paths: Vec<&String> = gguf
        .iter()
        .chain(&license)
        .chain(chat_template.as_ref())
        .collect();
    if paths.len() > moat_api::frame::MAX_FDS {
        bail!(
            "{} files are more than one package takes ({}); merge the shards of the model (llama-gguf-split --merge) or drop some licenses",
            paths.len(),
            moat_api::frame::MAX_FDS
        );
    }
    // Opened here, with the caller's permissions; the daemon reads only these.
    let files = paths
        .iter()
        .map(|p| std::fs::File::open(p).with_context(|| format!("cannot open {p}")))
        .collect::<Result<Vec<_>>>()?;
    let name = |p: &String| {
        std::path::Path::new(p)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.clone())
    };
    let request = ModelPackageRequest {
        reference,
        ggufs: gguf.iter().map(name).collect(),
        licenses: license.iter().map(name).collect(),
        chat_template: chat_template.as_ref().map(name),
        context_size,
    };
    let fds: Vec<i32> = files.iter().map(AsRawFd::as_raw_fd).collect();
    let model: ModelInfo = call_with_fds(&Request::ModelPackage(request), &fds)?;
    println!(
        "Packaged {} ({})",
        model.tags.last().cloned().unwrap_or_default(),
        model.id
    );
    Ok(0)
}

/// The columns of `docker model ls`, one row per tag.
fn print_table(models: &[ModelInfo], now: i64) {
    let rows: Vec<Vec<String>> = models
        .iter()
        .flat_map(|m| {
            let names: Vec<String> = if m.tags.is_empty() {
                vec!["<none>".to_string()]
            } else {
                m.tags.iter().map(|t| display_name(t)).collect()
            };
            names.into_iter().map(move |name| row(m, name, now))
        })
        .collect();
    table(
        &[
            "MODEL NAME",
            "PARAMETERS",
            "QUANTIZATION",
            "ARCHITECTURE",
            "MODEL ID",
            "CREATED",
            "CONTEXT",
            "SIZE",
        ],
        &rows,
    );
}

fn row(m: &ModelInfo, name: String, now: i64) -> Vec<String> {
    let text = |k: &str| m.config[k].as_str().unwrap_or_default().to_string();
    let architecture = text("architecture");
    let context = m.config["context_size"].as_u64().or_else(|| {
        m.config["gguf"][format!("{architecture}.context_length")]
            .as_str()
            .and_then(|v| v.parse().ok())
    });
    vec![
        name,
        text("parameters"),
        text("quantization"),
        architecture,
        short_id(&m.id),
        format!("{} ago", human_duration(now - m.created)),
        context.map_or_else(|| "-".to_string(), |c| c.to_string()),
        text("size"),
    ]
}

/// As `docker model ls` shows a tag: without the `ai/` namespace and `:latest`.
fn display_name(tag: &str) -> String {
    let name = tag.strip_prefix("ai/").unwrap_or(tag);
    name.strip_suffix(":latest").unwrap_or(name).to_string()
}

/// The 12 hex digits after `sha256:`.
fn short_id(id: &str) -> String {
    id.trim_start_matches("sha256:").chars().take(12).collect()
}

/// A model as `docker model inspect` prints it, fields in DMR's order.
#[derive(serde::Serialize)]
struct Dmr<'a> {
    id: &'a str,
    tags: &'a [String],
    created: i64,
    config: ModelConfig,
}

fn dmr(m: &ModelInfo) -> Dmr<'_> {
    Dmr {
        id: &m.id,
        tags: &m.tags,
        created: m.created,
        // The daemon sent what a ModelConfig serialises to.
        config: serde_json::from_value(m.config.clone()).unwrap_or_default(),
    }
}

/// OpenAI's model object, as DMR's `/engines/v1/models` gives it.
fn openai_model(m: &ModelInfo) -> serde_json::Value {
    serde_json::json!({
        "id": m.tags.first().cloned().unwrap_or_else(|| m.id.clone()),
        "object": "model",
        "created": m.created,
        "owned_by": "docker",
    })
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Docker's `units.HumanDuration`: "About a minute", "3 hours", "2 weeks".
fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    let minutes = secs / 60;
    let hours = (secs as f64 / 3600.0).round() as i64;
    match secs {
        0 => "Less than a second".to_string(),
        1 => "1 second".to_string(),
        s if s < 60 => format!("{s} seconds"),
        _ if minutes == 1 => "About a minute".to_string(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".to_string(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", secs / 3600 / 24 / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_durations_read_as_docker_model_ls() {
        assert_eq!(
            [
                "ai/smollm2:latest",
                "ai/smollm2:135M-Q4_1",
                "localhost:5000/ai/smollm2:latest",
                "me/x:v1",
            ]
            .map(display_name),
            [
                "smollm2",
                "smollm2:135M-Q4_1",
                "localhost:5000/ai/smollm2",
                "me/x:v1"
            ]
        );
        assert_eq!(
            [
                0,
                1,
                59,
                90,
                600,
                3600,
                7200,
                3 * 86400,
                20 * 86400,
                90 * 86400,
                800 * 86400
            ]
            .map(human_duration),
            [
                "Less than a second",
                "1 second",
                "59 seconds",
                "About a minute",
                "10 minutes",
                "About an hour",
                "2 hours",
                "3 days",
                "2 weeks",
                "3 months",
                "2 years"
            ]
        );
    }
}

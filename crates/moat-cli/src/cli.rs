//! The command line. `moat sandbox …` mirrors `docker sandbox …` (same
//! commands, flags and columns); `moat image …` and `moat template …` work on
//! the image store. Every command is a request to the daemon.

use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use moat_api::{
    CreateSandbox, ExecRequest, LimitsRequest, NetworkProxyRequest, PortMapping, Request,
    SandboxInfo, VersionInfo,
};
use moat_images::ImageInfo;

use crate::client::{call, call_with_fds};
use crate::output::{human_size, table, truncate};
use crate::terminal;

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "Run AI coding agents in Linux sandboxes, with an egress gateway and local models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sandboxes (mirrors `docker sandbox`)
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// The image store
    #[command(subcommand)]
    Image(ImageCmd),
    /// Templates: images built from recipes
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Local models (mirrors `docker model`)
    #[command(subcommand)]
    Model(crate::model::ModelCmd),
    /// API keys the gateway puts into requests (they never enter a sandbox)
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Docker CLI plugins: `docker sandbox …` and `docker model …` through moat
    #[command(subcommand)]
    Plugins(PluginsCmd),
    /// Run the daemon in the foreground (the CLI starts it when needed)
    Daemon,
    /// Show the versions of the client and the daemon
    Version,
}

#[derive(Args, Clone, Default)]
struct CreateFlags {
    /// Name of the sandbox (default: AGENT-WORKSPACE_DIR, numbered on collision)
    #[arg(long)]
    name: Option<String>,
    /// Template or image to start from (default: the agent's template)
    #[arg(short = 't', long = "template")]
    template: Option<String>,
    /// When to pull a template image that names a registry: always, missing or never
    #[arg(long = "pull-template", default_value = "missing")]
    pull_template: String,
    /// Memory limit, e.g. 2g
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit in cores, e.g. 1.5
    #[arg(long)]
    cpus: Option<f64>,
    /// Limit on the number of processes
    #[arg(long = "pids-limit")]
    pids_limit: Option<u64>,
    /// Disk budget: what the sandbox may write (its own layer, /dev/shm), e.g. 20g; 0 for none
    #[arg(long)]
    disk: Option<String>,
    /// Isolation tier: namespaces, or gvisor (gVisor's runsc); default from `sandbox.isolation`
    #[arg(long)]
    isolation: Option<String>,
}

#[derive(Subcommand)]
enum SandboxCmd {
    /// Create a sandbox for an agent on a workspace, and start it
    Create {
        #[command(flatten)]
        flags: CreateFlags,
        /// Print only the sandbox's name
        #[arg(short, long)]
        quiet: bool,
        /// The agent: shell, openclaw, claude or codex
        agent: String,
        /// The workspace folder (read-write), then extra ones (read-only with :ro)
        #[arg(required = true)]
        workspaces: Vec<String>,
    },
    /// Start a sandbox's agent in a terminal: `run NAME [-- ARGS]` or `run AGENT [WORKSPACE…] [-- ARGS]`
    Run {
        #[command(flatten)]
        flags: CreateFlags,
        /// A sandbox's name, or an agent
        target: String,
        /// Workspaces, when TARGET is an agent (default: the current folder)
        workspaces: Vec<String>,
        /// Arguments for the agent
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run a command in a running sandbox
    Exec {
        /// Detached: start the command and return
        #[arg(short, long)]
        detach: bool,
        /// Set an environment variable (KEY=VALUE)
        #[arg(short, long = "env")]
        env: Vec<String>,
        /// Read environment variables from a file
        #[arg(long = "env-file")]
        env_file: Vec<String>,
        /// Keep stdin open
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a terminal
        #[arg(short, long)]
        tty: bool,
        /// User (name, uid or uid:gid; default agent)
        #[arg(short, long)]
        user: Option<String>,
        /// Working directory (default: the workspace)
        #[arg(short, long)]
        workdir: Option<String>,
        name: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// List sandboxes
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
        #[arg(short, long)]
        quiet: bool,
        #[arg(long = "no-trunc")]
        no_trunc: bool,
    },
    /// Show sandboxes as JSON
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Stop sandboxes (their files stay)
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove sandboxes (stopping them first)
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove every sandbox
    Reset {
        /// Do not ask
        #[arg(short, long)]
        force: bool,
    },
    /// Publish sandbox ports on the host's loopback, or list them
    Ports {
        name: String,
        /// HOST_PORT:SANDBOX_PORT
        #[arg(long)]
        publish: Vec<String>,
        /// HOST_PORT
        #[arg(long)]
        unpublish: Vec<u16>,
        #[arg(long)]
        json: bool,
    },
    /// Save a stopped sandbox's changes as an image (its image plus one layer)
    Save {
        name: String,
        /// The new image's name, e.g. my-agent:latest
        reference: String,
        /// Write an OCI archive to this file instead of storing the image
        #[arg(short, long)]
        output: Option<String>,
    },
    /// Network policy and log of sandboxes
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Show the versions of the client and the daemon
    Version,
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Change a sandbox's network policy; it applies at once and persists
    Proxy {
        name: String,
        /// Default for what no rule names: allow or deny
        #[arg(long)]
        policy: Option<String>,
        /// Start over from a preset: deny-all, balanced or allow-all
        #[arg(long)]
        preset: Option<String>,
        /// Allow a host: example.com, *.example.com, either with :PORT
        #[arg(long = "allow-host")]
        allow_host: Vec<String>,
        #[arg(long = "block-host")]
        block_host: Vec<String>,
        #[arg(long = "allow-cidr")]
        allow_cidr: Vec<String>,
        #[arg(long = "block-cidr")]
        block_cidr: Vec<String>,
        /// Allow a host and tunnel it without TLS interception
        #[arg(long = "bypass-host")]
        bypass_host: Vec<String>,
        #[arg(long = "bypass-cidr")]
        bypass_cidr: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// What sandboxes reached, or tried to: aggregated, or every request with --json
    Log {
        /// One sandbox (default: all)
        name: Option<String>,
        #[arg(long)]
        json: bool,
        /// How many of the newest requests to read
        #[arg(long, default_value_t = 10_000)]
        limit: u32,
        /// Only HOST:PORT, one a line
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List images
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove images
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Import a root file system tarball as an image
    Import { tarball: String, reference: String },
    /// Give an image another name: SOURCE TARGET
    Tag { source: String, target: String },
    /// Push an image to the registry its name starts with
    Push { reference: String },
    /// Pull an image from the registry its name starts with
    Pull { reference: String },
    /// Show images' manifests and configs as JSON
    Inspect {
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Load the images of an OCI archive
    Load {
        /// The archive (default: stdin)
        #[arg(short, long)]
        input: Option<String>,
    },
    /// Store credentials for a registry (the daemon's user alone can read them)
    Login {
        registry: String,
        #[arg(short, long)]
        username: String,
        /// Read the password from stdin
        #[arg(long = "password-stdin")]
        password_stdin: bool,
    },
    /// Forget the credentials for a registry
    Logout { registry: String },
}

#[derive(Subcommand)]
enum SecretCmd {
    /// Store the key for a service (anthropic, openai, …), read from stdin
    Set { service: String },
    /// Forget a stored key
    Rm { service: String },
    /// Services, their hosts and where their key comes from; never the key
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PluginsCmd {
    /// Link docker-sandbox and docker-model to this binary in Docker's plugin folder
    Install {
        /// The plugin folder (default: $DOCKER_CONFIG/cli-plugins or ~/.docker/cli-plugins)
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Replace plugins of those names that are not moat
        #[arg(long)]
        force: bool,
    },
    /// Remove the links that `install` made
    Uninstall {
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Build a template (shell, node, openclaw, claude, codex); cached once built
    Build { name: String },
    /// List the templates moat can build
    Ls,
}

pub fn main(args: Vec<String>) -> Result<i32> {
    let cli = Cli::parse_from(args);
    if !matches!(cli.command, Command::Daemon) {
        // A command piped into `head` ends quietly, as other tools do; the
        // daemon keeps ignoring SIGPIPE so that a vanished client cannot kill it.
        // SAFETY: setting a signal's disposition to its default.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Daemon => {
            // Whatever the daemon inherited stays out of everything it starts.
            moat_sandbox::cloexec_from(3);
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let config = moat_daemon::Config::load()?;
            moat_daemon::run(moat_daemon::Paths::from_env(), config)?;
            Ok(0)
        }
        Command::Version | Command::Sandbox(SandboxCmd::Version) => version(),
        Command::Sandbox(cmd) => sandbox(cmd),
        Command::Image(cmd) => image(cmd),
        Command::Template(cmd) => template(cmd),
        Command::Model(cmd) => crate::model::run(cmd),
        Command::Secret(cmd) => secret(cmd),
        Command::Plugins(cmd) => plugins(cmd),
    }
}

fn version() -> Result<i32> {
    println!("Client: moat {}", env!("CARGO_PKG_VERSION"));
    let v: VersionInfo = call(&Request::Version)?;
    println!(
        "Daemon: moat {} (pid {}, protocol {}, {})",
        v.version,
        v.pid,
        v.protocol,
        if v.rootless { "rootless" } else { "root" }
    );
    Ok(0)
}

/// Workspace arguments made absolute against the current folder, `:ro` kept.
fn absolute_workspaces(raw: &[String]) -> Result<Vec<String>> {
    let cwd = std::env::current_dir().context("cannot read the current folder")?;
    Ok(raw
        .iter()
        .map(|w| {
            let (path, suffix) = match w.rsplit_once(':') {
                Some((p, s @ ("ro" | "readonly" | "rw"))) => (
                    p,
                    if s == "rw" {
                        String::new()
                    } else {
                        format!(":{s}")
                    },
                ),
                _ => (w.as_str(), String::new()),
            };
            let p = Path::new(path);
            let abs = if p.is_absolute() {
                p.to_path_buf()
            } else {
                cwd.join(p)
            };
            let abs = std::fs::canonicalize(&abs).unwrap_or(abs);
            format!("{}{suffix}", abs.display())
        })
        .collect())
}

fn create_request(
    agent: &str,
    workspaces: &[String],
    flags: &CreateFlags,
) -> Result<CreateSandbox> {
    if !["always", "missing", "never"].contains(&flags.pull_template.as_str()) {
        bail!("--pull-template takes always, missing or never");
    }
    let memory = flags
        .memory
        .as_deref()
        .map(moat_daemon::config::parse_size)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
    let disk = flags
        .disk
        .as_deref()
        .map(|d| {
            let bytes = moat_daemon::config::parse_size(d)?;
            moat_daemon::disk::check_budget(bytes).map_err(|e| e.to_string())?;
            Ok::<u64, String>(bytes)
        })
        .transpose()
        .map_err(|e| anyhow::anyhow!("--disk: {e}"))?;
    Ok(CreateSandbox {
        name: flags.name.clone(),
        agent: agent.to_string(),
        template: flags.template.clone(),
        workspaces: absolute_workspaces(workspaces)?,
        limits: LimitsRequest {
            memory,
            cpus: flags.cpus,
            pids: flags.pids_limit,
            disk,
        },
        pull_template: Some(flags.pull_template.clone()),
        isolation: flags
            .isolation
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| anyhow::anyhow!("--isolation: {e}"))?,
    })
}

fn sandbox(cmd: SandboxCmd) -> Result<i32> {
    match cmd {
        SandboxCmd::Create {
            flags,
            quiet,
            agent,
            workspaces,
        } => {
            let info: SandboxInfo = call(&Request::SandboxCreate(create_request(
                &agent,
                &workspaces,
                &flags,
            )?))?;
            if quiet {
                println!("{}", info.name);
            } else {
                println!(
                    "Created sandbox {} ({} on {})",
                    info.name, info.agent, info.workspaces[0].path
                );
            }
            Ok(0)
        }
        SandboxCmd::Run {
            flags,
            target,
            workspaces,
            args,
        } => {
            let existing = call::<SandboxInfo>(&Request::SandboxInspect {
                name: target.clone(),
            })
            .ok();
            let info: SandboxInfo = match existing {
                Some(s) if workspaces.is_empty() => call(&Request::SandboxStart { name: s.name })?,
                _ => {
                    let ws = if workspaces.is_empty() {
                        vec![".".to_string()]
                    } else {
                        workspaces
                    };
                    call(&Request::SandboxEnsure(create_request(
                        &target, &ws, &flags,
                    )?))?
                }
            };
            let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
            terminal::exec(
                ExecRequest {
                    name: info.name,
                    argv: args,
                    agent: true,
                    tty,
                    ..Default::default()
                },
                true,
            )
        }
        SandboxCmd::Exec {
            detach,
            env,
            env_file,
            interactive,
            tty,
            user,
            workdir,
            name,
            command,
        } => {
            let mut all_env = Vec::new();
            for file in &env_file {
                all_env.extend(read_env_file(file)?);
            }
            for e in env {
                // `-e KEY` alone passes the caller's value, as Docker does.
                if e.contains('=') {
                    all_env.push(e);
                } else if let Ok(v) = std::env::var(&e) {
                    all_env.push(format!("{e}={v}"));
                }
            }
            let req = ExecRequest {
                name,
                argv: command,
                agent: false,
                env: all_env,
                user,
                workdir,
                tty,
                detach,
                ..Default::default()
            };
            terminal::exec(req, interactive)
        }
        SandboxCmd::Ls {
            json,
            quiet,
            no_trunc,
        } => {
            let list: Vec<SandboxInfo> = call(&Request::SandboxList)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if quiet {
                list.iter().for_each(|s| println!("{}", s.name));
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|s| {
                        let ws: Vec<String> = s
                            .workspaces
                            .iter()
                            .map(|w| {
                                if w.read_only {
                                    format!("{}:ro", w.path)
                                } else {
                                    w.path.clone()
                                }
                            })
                            .collect();
                        vec![
                            s.name.clone(),
                            s.agent.clone(),
                            s.status.to_string(),
                            s.isolation.tier.to_string(),
                            truncate(&ws.join(", "), 60, no_trunc),
                        ]
                    })
                    .collect();
                table(
                    &["SANDBOX", "AGENT", "STATUS", "ISOLATION", "WORKSPACE"],
                    &rows,
                );
            }
            Ok(0)
        }
        SandboxCmd::Inspect { names } => {
            let mut out = Vec::new();
            let mut code = 0;
            for name in names {
                match call::<SandboxInfo>(&Request::SandboxInspect { name }) {
                    Ok(i) => out.push(i),
                    Err(e) => {
                        eprintln!("moat: {e:#}");
                        code = 1;
                    }
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(code)
        }
        SandboxCmd::Stop { names } => each(names, |name| {
            call::<SandboxInfo>(&Request::SandboxStop { name }).map(|i| i.name)
        }),
        SandboxCmd::Rm { names } => each(names, |name| {
            call::<SandboxInfo>(&Request::SandboxRm { name }).map(|i| i.name)
        }),
        SandboxCmd::Reset { force } => {
            if !force {
                if !std::io::stdin().is_terminal() {
                    bail!("reset removes every sandbox; add -f to do it without asking");
                }
                eprint!("This removes every sandbox and its files. Continue? [y/N] ");
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    return Ok(1);
                }
            }
            let removed: Vec<String> = call(&Request::SandboxReset)?;
            removed.iter().for_each(|n| println!("{n}"));
            Ok(0)
        }
        SandboxCmd::Save {
            name,
            reference,
            output,
        } => {
            let archive = output
                .as_deref()
                .map(|path| {
                    std::fs::File::create(path).with_context(|| format!("cannot create {path}"))
                })
                .transpose()?;
            let fds: Vec<i32> = archive.iter().map(AsRawFd::as_raw_fd).collect();
            let result = call_with_fds::<ImageInfo>(
                &Request::SandboxSave {
                    name,
                    reference,
                    to_archive: archive.is_some(),
                },
                &fds,
            );
            match (result, output) {
                (Ok(_), Some(path)) => println!("Wrote {path}"),
                (Ok(info), None) => println!("{}", info.id),
                (Err(e), Some(path)) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
                (Err(e), None) => return Err(e),
            }
            Ok(0)
        }
        SandboxCmd::Ports {
            name,
            publish,
            unpublish,
            json,
        } => {
            let publish = publish
                .iter()
                .map(|p| p.parse::<PortMapping>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let req = if publish.is_empty() && unpublish.is_empty() {
                Request::SandboxInspect { name }
            } else {
                Request::SandboxPorts {
                    name,
                    publish,
                    unpublish,
                }
            };
            let info: SandboxInfo = call(&req)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info.ports)?);
            } else {
                let rows: Vec<Vec<String>> = info
                    .ports
                    .iter()
                    .map(|p| {
                        vec![
                            format!("127.0.0.1:{}", p.host_port),
                            p.sandbox_port.to_string(),
                        ]
                    })
                    .collect();
                table(&["HOST", "SANDBOX PORT"], &rows);
            }
            Ok(0)
        }
        SandboxCmd::Network(cmd) => network(cmd),
        SandboxCmd::Version => version(),
    }
}

fn network(cmd: NetworkCmd) -> Result<i32> {
    match cmd {
        NetworkCmd::Proxy {
            name,
            policy,
            preset,
            allow_host,
            block_host,
            allow_cidr,
            block_cidr,
            bypass_host,
            bypass_cidr,
            json,
        } => {
            let req = NetworkProxyRequest {
                name: name.clone(),
                policy,
                preset,
                allow_hosts: allow_host,
                block_hosts: block_host,
                allow_cidrs: allow_cidr,
                block_cidrs: block_cidr,
                bypass_hosts: bypass_host,
                bypass_cidrs: bypass_cidr,
            };
            let policy: moat_gateway::Policy = call(&Request::NetworkProxy(req))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&policy)?);
            } else {
                let default = match policy.default {
                    moat_gateway::policy::Default::Allow => "allow",
                    moat_gateway::policy::Default::Deny => "deny",
                };
                println!("{name}: default {default}, {} rules", policy.rules.len());
                for rule in &policy.rules {
                    println!("  {rule}");
                }
            }
            Ok(0)
        }
        NetworkCmd::Log {
            name,
            json,
            limit,
            quiet,
        } => {
            let rows: Vec<moat_gateway::LogEntry> = call(&Request::NetworkLog { name, limit })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if quiet {
                rows.iter().for_each(|r| println!("{}:{}", r.host, r.port));
            } else {
                for (title, decision) in [
                    ("Blocked requests", "blocked"),
                    ("Allowed requests", "allowed"),
                ] {
                    println!("{title}");
                    table(
                        &["SANDBOX", "HOST", "RULE", "LAST SEEN", "COUNT"],
                        &aggregate(&rows, decision),
                    );
                    println!();
                }
            }
            Ok(0)
        }
    }
}

/// Log rows of one decision, one line per sandbox, host:port and rule, newest first.
fn aggregate(rows: &[moat_gateway::LogEntry], decision: &str) -> Vec<Vec<String>> {
    let mut groups: Vec<(String, String, String, String, usize)> = Vec::new();
    for r in rows.iter().filter(|r| r.decision == decision) {
        let host = format!("{}:{}", r.host, r.port);
        match groups
            .iter_mut()
            .find(|g| g.0 == r.sandbox && g.1 == host && g.2 == r.rule)
        {
            Some(g) => {
                g.3 = g.3.clone().max(r.time.clone());
                g.4 += 1;
            }
            None => groups.push((r.sandbox.clone(), host, r.rule.clone(), r.time.clone(), 1)),
        }
    }
    groups.sort_by(|a, b| b.3.cmp(&a.3));
    groups
        .into_iter()
        .map(|(s, h, rule, t, n)| vec![s, h, rule, t, n.to_string()])
        .collect()
}

/// Run `f` on each name, printing what it returns; the exit code is 1 if any failed.
fn each(names: Vec<String>, f: impl Fn(String) -> Result<String>) -> Result<i32> {
    let mut code = 0;
    for name in names {
        match f(name) {
            Ok(out) => println!("{out}"),
            Err(e) => {
                eprintln!("moat: {e:#}");
                code = 1;
            }
        }
    }
    Ok(code)
}

fn read_env_file(path: &str) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read env file {path}"))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            if l.contains('=') {
                l.to_string()
            } else {
                format!("{l}={}", std::env::var(l).unwrap_or_default())
            }
        })
        .collect())
}

fn image(cmd: ImageCmd) -> Result<i32> {
    match cmd {
        ImageCmd::Ls { json, quiet } => {
            let list: Vec<ImageInfo> = call(&Request::ImageList)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if quiet {
                list.iter().for_each(|i| println!("{}", i.reference));
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|i| {
                        // `name@sha256:…` (pulled by digest) has no tag, as Docker shows it.
                        let (repo, tag) = match i.reference.split_once('@') {
                            Some((repo, _)) => (repo, "<none>"),
                            None => i.reference.rsplit_once(':').unwrap_or((&i.reference, "")),
                        };
                        let id =
                            i.id.trim_start_matches("sha256:")
                                .chars()
                                .take(12)
                                .collect();
                        vec![
                            repo.to_string(),
                            tag.to_string(),
                            id,
                            i.created.clone(),
                            human_size(i.size),
                        ]
                    })
                    .collect();
                table(&["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], &rows);
            }
            Ok(0)
        }
        ImageCmd::Rm { references } => each(references, |reference| {
            call::<ImageInfo>(&Request::ImageRm { reference })
                .map(|i| format!("Untagged: {}", i.reference))
        }),
        ImageCmd::Tag { source, target } => {
            call::<ImageInfo>(&Request::ImageTag { source, target })?;
            Ok(0)
        }
        ImageCmd::Push { reference } => {
            let summary: serde_json::Value = call(&Request::ImagePush {
                reference: reference.clone(),
            })?;
            crate::output::print_pushed(&reference, &summary);
            Ok(0)
        }
        ImageCmd::Pull { reference } => {
            let info: ImageInfo = call(&Request::ImagePull { reference })?;
            println!("Pulled {} ({})", info.reference, info.id);
            Ok(0)
        }
        ImageCmd::Inspect { references } => {
            let mut out = Vec::new();
            for reference in references {
                out.push(call::<serde_json::Value>(&Request::ImageInspect {
                    reference,
                })?);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(0)
        }
        ImageCmd::Load { input } => {
            let file = match input {
                Some(path) => {
                    std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?
                }
                None => std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?),
            };
            let loaded: Vec<ImageInfo> = call_with_fds(&Request::ImageLoad, &[file.as_raw_fd()])?;
            for info in loaded {
                println!("Loaded image: {}", info.reference);
            }
            Ok(0)
        }
        ImageCmd::Login {
            registry,
            username,
            password_stdin,
        } => {
            let password = if password_stdin {
                let mut p = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut p)?;
                p.trim_end_matches(['\n', '\r']).to_string()
            } else {
                read_key(&format!("{username}@{registry} (password)"))?
            };
            let message: String = call(&Request::RegistryLogin {
                registry,
                username,
                password: moat_api::SecretValue(password),
            })?;
            println!("{message}");
            Ok(0)
        }
        ImageCmd::Logout { registry } => {
            let message: String = call(&Request::RegistryLogout { registry })?;
            println!("{message}");
            Ok(0)
        }
        ImageCmd::Import { tarball, reference } => {
            let path = std::fs::canonicalize(&tarball)
                .with_context(|| format!("cannot find {tarball}"))?;
            let info: ImageInfo = call(&Request::ImageImport {
                path: path.display().to_string(),
                reference,
            })?;
            println!("{}", info.id);
            Ok(0)
        }
    }
}

#[derive(serde::Deserialize)]
struct SecretStatus {
    service: String,
    hosts: Vec<String>,
    source: String,
}

fn secret(cmd: SecretCmd) -> Result<i32> {
    let statuses: Vec<serde_json::Value> = match cmd {
        SecretCmd::Set { service } => {
            let key = read_key(&service)?;
            call(&Request::SecretSet {
                name: service,
                key: moat_api::SecretValue(key),
            })?
        }
        SecretCmd::Rm { service } => call(&Request::SecretRm { name: service })?,
        SecretCmd::Ls { json: true } => {
            let v: Vec<serde_json::Value> = call(&Request::SecretLs)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(0);
        }
        SecretCmd::Ls { json: false } => call(&Request::SecretLs)?,
    };
    let rows: Vec<Vec<String>> = statuses
        .into_iter()
        .filter_map(|v| serde_json::from_value::<SecretStatus>(v).ok())
        .map(|s| {
            let set = if s.source.is_empty() {
                "no".to_string()
            } else {
                format!("yes ({})", s.source)
            };
            vec![s.service, s.hosts.join(", "), set]
        })
        .collect();
    table(&["SERVICE", "HOSTS", "KEY SET"], &rows);
    Ok(0)
}

/// The key from stdin, without echoing it on a terminal.
fn read_key(service: &str) -> Result<String> {
    use std::io::BufRead;
    let stdin = std::io::stdin();
    let mut key = String::new();
    if stdin.is_terminal() {
        eprint!("Key for {service} (not shown): ");
        let fd = std::os::fd::AsFd::as_fd(&stdin);
        let saved = nix::sys::termios::tcgetattr(fd)?;
        let mut quiet = saved.clone();
        quiet
            .local_flags
            .remove(nix::sys::termios::LocalFlags::ECHO);
        nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, &quiet)?;
        let read = stdin.lock().read_line(&mut key);
        nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, &saved)?;
        eprintln!();
        read?;
    } else {
        stdin.lock().read_line(&mut key)?;
    }
    Ok(key.trim().to_string())
}

fn plugins(cmd: PluginsCmd) -> Result<i32> {
    match cmd {
        PluginsCmd::Install { dir, force } => {
            let dir = dir.map_or_else(crate::plugins::default_dir, Ok)?;
            let exe = std::env::current_exe()
                .and_then(|e| e.canonicalize())
                .context("find the moat binary")?;
            for link in crate::plugins::install(&dir, &exe, force)? {
                println!("{} -> {}", link.display(), exe.display());
            }
            println!("`docker sandbox …` and `docker model …` now run moat");
        }
        PluginsCmd::Uninstall { dir } => {
            let dir = dir.map_or_else(crate::plugins::default_dir, Ok)?;
            for link in crate::plugins::uninstall(&dir)? {
                println!("removed {}", link.display());
            }
        }
    }
    Ok(0)
}

fn template(cmd: TemplateCmd) -> Result<i32> {
    match cmd {
        TemplateCmd::Build { name } => {
            let info: ImageInfo = call(&Request::TemplateBuild { name })?;
            println!(
                "Built {} ({}, {})",
                info.reference,
                &info.id,
                human_size(info.size)
            );
            Ok(0)
        }
        TemplateCmd::Ls => {
            println!(
                "{:<10} {:<8} {:<6} DESCRIPTION",
                "TEMPLATE", "FROM", "AGENT"
            );
            for name in moat_images::template::names() {
                println!(
                    "{name:<10} {:<8} {:<6} a Debian bookworm root with bash, git, curl, python3, sudo",
                    "debian", "yes"
                );
            }
            for e in moat_images::layered::EMBEDDED {
                let recipe = e.recipe()?;
                let agent = if recipe.agent.is_some() { "yes" } else { "no" };
                println!(
                    "{:<10} {:<8} {agent:<6} {}",
                    e.name, recipe.from, recipe.description
                );
            }
            Ok(0)
        }
    }
}

//! Templates: the images sandboxes start from, built when first needed.
//! `shell` is bootstrapped from Debian's packages (moat-images' `template`);
//! the others are layered recipes (`templates/NAME/` in the repository),
//! whose steps run in a sandbox whose policy allows only the hosts the
//! recipe names, so that the gateway decides, and logs, everything a build
//! fetches. A request to any other host fails the build, naming the host.
//! A built layer is cached under its recipe's digest (which covers the base
//! below it), so that a fresh state root gets it without building again,
//! and an image whose digest label no longer matches its recipe is rebuilt.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use moat_api::init::{InitExec, InitStdio};
use moat_api::{CreateSandbox, SandboxInfo};
use moat_gateway::{Action, LogEntry, Policy, Rule};
use moat_images::layered::{self, Embedded, LayeredRecipe};
use moat_images::{template, ImageInfo, Reference};
use moat_sandbox::control;

use crate::sandboxes::{lock, template_reference, Daemon};
use crate::server::Replies;
use crate::step_output::{self, StepEnd};
use crate::DaemonError;

/// The label that ties a template image to the recipe digest it was built from.
const LABEL_DIGEST: &str = "dev.moat.template.digest";
/// What `moat sandbox run` starts in the `shell` agent.
const SHELL_COMMAND: &[&str] = &["bash", "-l"];
/// Lines of a failed step's output that its error repeats.
const TAIL_LINES: usize = 25;

/// An agent: the template its sandboxes start from and what `run` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub template: String,
    pub command: Vec<String>,
}

/// Names of the sandboxes template builds run in; no one else may use them,
/// so that a daemon can remove the ones an interrupted build left.
pub const BUILD_SANDBOX_PREFIX: &str = "template-build-";

pub fn is_build_sandbox(name: &str) -> bool {
    name.starts_with(BUILD_SANDBOX_PREFIX)
}

/// The agent of that name: `shell`, or a template whose recipe names a command.
pub fn agent(name: &str) -> Result<Agent, DaemonError> {
    if name == "shell" {
        return Ok(Agent {
            template: "shell".into(),
            command: SHELL_COMMAND.iter().map(|s| s.to_string()).collect(),
        });
    }
    let command = layered::find(name)
        .and_then(|e| e.recipe().ok())
        .and_then(|r| r.agent);
    match command {
        Some(command) => Ok(Agent {
            template: name.to_string(),
            command,
        }),
        None => Err(DaemonError::BadRequest(format!(
            "unknown agent {name:?}; agents are: {}",
            agents().join(", ")
        ))),
    }
}

/// Names of the agents, `shell` first.
pub fn agents() -> Vec<&'static str> {
    std::iter::once("shell")
        .chain(
            layered::EMBEDDED
                .iter()
                .filter(|e| e.recipe().is_ok_and(|r| r.agent.is_some()))
                .map(|e| e.name),
        )
        .collect()
}

/// Whether a template of that name exists (bootstrapped or layered).
pub fn exists(name: &str) -> bool {
    template::recipe(name).is_some() || layered::find(name).is_some()
}

/// Every template name, the bootstrapped ones first.
pub fn names() -> Vec<&'static str> {
    template::names()
        .into_iter()
        .chain(layered::EMBEDDED.iter().map(|e| e.name))
        .collect()
}

/// What a build fetched, per host: (allowed, blocked) requests.
type Fetched = BTreeMap<String, (u32, u32)>;
/// Builds being watched, by sandbox name.
pub type BuildWatch = BTreeMap<String, Fetched>;

fn find_layered(name: &str) -> Result<&'static layered::Embedded, DaemonError> {
    layered::find(name).ok_or_else(|| {
        DaemonError::BadRequest(format!(
            "no template named {name:?}; templates are {}",
            names().join(", ")
        ))
    })
}

/// The digest a current image of template `name` is labelled with: its
/// recipe's, and for a layered recipe, folded with its base's.
fn recipe_digest(name: &str) -> Result<String, DaemonError> {
    if let Some(recipe) = template::recipe(name) {
        return Ok(recipe.digest());
    }
    let embedded = find_layered(name)?;
    let base = recipe_digest(&embedded.recipe()?.from)?;
    Ok(embedded.digest(&base))
}

impl Daemon {
    /// `moat template build NAME`: the template's image, built if missing or stale.
    pub fn template_build(&self, name: &str, r: &Replies) -> Result<ImageInfo, DaemonError> {
        self.ensure_template(name, r)
    }

    /// The image of template `name`, built (with what it starts from) when
    /// the store lacks it or holds one made from another recipe.
    pub(crate) fn ensure_template(
        &self,
        name: &str,
        r: &Replies,
    ) -> Result<ImageInfo, DaemonError> {
        // An image that is current needs no lock: creating a sandbox does not
        // wait for another template's build.
        let reference = Reference::parse(&template_reference(name))?;
        if let Some(image) = self.current_template(&reference, &recipe_digest(name)?)? {
            return Ok(image);
        }
        let _one_build_at_a_time = match self.template_lock.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                r.progress("waiting for another template build to finish".to_string());
                lock(&self.template_lock)
            }
        };
        self.ensure_template_locked(name, r)
    }

    fn ensure_template_locked(&self, name: &str, r: &Replies) -> Result<ImageInfo, DaemonError> {
        let reference = Reference::parse(&template_reference(name))?;
        let created_by = format!("moat template build {name}");
        let digest = recipe_digest(name)?;
        if let Some(image) = self.current_template(&reference, &digest)? {
            return Ok(image);
        }
        if let Some(recipe) = template::recipe(name) {
            r.progress(format!(
                "building template {name} from Debian packages (about a minute, once)"
            ));
            let tar = template::build_rootfs(recipe, &self.paths.cache, &mut |line: &str| {
                r.progress(line.to_string())
            })?;
            r.progress(format!("importing template {name} into the image store"));
            let _guard = lock(&self.image_lock);
            let image = self.images.import_rootfs(
                &tar,
                &reference,
                &created_by,
                digest_label(&digest),
                &self.unpacker(),
            )?;
            return Ok(image);
        }
        let embedded = find_layered(name)?;
        let recipe = embedded.recipe()?;
        let base = self.ensure_template_locked(&recipe.from, r)?;
        let cache = self.paths.cache.join("templates");
        fs::create_dir_all(&cache)
            .map_err(|e| DaemonError::io(format!("create {}", cache.display()), e))?;
        let layer = cache.join(layered::layer_name(name, &digest));
        if layer.exists() {
            r.progress(format!(
                "template {name}: its layer is cached ({})",
                layer.display()
            ));
        } else {
            self.build_layer(embedded, &recipe, &base, &layer, r)?;
        }
        r.progress(format!("storing template {name}"));
        let _guard = lock(&self.image_lock);
        let image = self.images.commit_layer(
            &base,
            &layer,
            &reference,
            &created_by,
            digest_label(&digest),
            &self.unpacker(),
        )?;
        Ok(image)
    }

    /// The stored template image, when it was built from this digest.
    fn current_template(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<Option<ImageInfo>, DaemonError> {
        let _guard = lock(&self.image_lock);
        let Some(image) = self.images.get(reference)? else {
            return Ok(None);
        };
        let (_, config) = self.images.manifest_and_config(&image)?;
        let built_from = config.config.labels.get(LABEL_DIGEST);
        Ok((built_from.map(String::as_str) == Some(digest)).then_some(image))
    }

    /// Runs the recipe's steps in a fresh sandbox of `base` and writes the
    /// layer they leave to `layer` (whole or not at all).
    fn build_layer(
        &self,
        embedded: &Embedded,
        recipe: &LayeredRecipe,
        base: &ImageInfo,
        layer: &Path,
        r: &Replies,
    ) -> Result<(), DaemonError> {
        let name = embedded.name;
        let files = recipe_folder(embedded)?;
        // The build's workspace belongs to the agent's own host id (as
        // root), so that it is mounted as it is: a recipe's third-party code
        // writes nothing there as the folder's owner, host root.
        if !self.idmap.rootless {
            let agent = moat_sandbox::idmap::AGENT_UID;
            nix::unistd::chown(
                files.path(),
                self.idmap.host_uid(agent).map(nix::unistd::Uid::from_raw),
                self.idmap.host_gid(agent).map(nix::unistd::Gid::from_raw),
            )
            .map_err(|e| DaemonError::io("chown the recipe's folder", e.into()))?;
        }
        let mut policy =
            Policy::preset("deny-all").map_err(|e| DaemonError::Config(e.to_string()))?;
        for host in &recipe.allow_hosts {
            let rule = Rule::host(Action::Allow, host).map_err(|e| {
                DaemonError::BadRequest(format!("templates/{name}/template.toml: {e}"))
            })?;
            policy.add(rule);
        }
        let sandbox = format!("{BUILD_SANDBOX_PREFIX}{name}-{}", &random_hex()[..6]);
        r.progress(format!(
            "building template {name} from {} in sandbox {sandbox}; it may reach only: {}",
            recipe.from,
            if recipe.allow_hosts.is_empty() {
                "nothing".to_string()
            } else {
                recipe.allow_hosts.join(", ")
            }
        ));
        let req = CreateSandbox {
            name: Some(sandbox.clone()),
            agent: "shell".into(),
            template: None,
            workspaces: vec![files.path().display().to_string()],
            // A recipe's steps are moat's own, not an agent's: they may use
            // every core (installs are what a first sandbox waits for).
            limits: moat_api::LimitsRequest {
                cpus: Some(std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)),
                ..Default::default()
            },
            pull_template: None,
            // moat's own recipes build in the namespace tier whatever the
            // configured default: their images serve every tier.
            isolation: Some(moat_api::Isolation::Namespaces),
        };
        lock(&self.build_watch).insert(sandbox.clone(), Fetched::new());
        let built = self
            .create_from_image(&req, base, Some(&policy), r)
            .and_then(|info| {
                self.run_steps(name, &info, recipe, files.path(), r)?;
                self.stop(&sandbox)?;
                self.write_build_layer(&info, base, layer)
            });
        let fetched = lock(&self.build_watch).remove(&sandbox).unwrap_or_default();
        for (host, (allowed, blocked)) in &fetched {
            r.progress(format!(
                "template {name} fetched from {host}: {allowed} requests allowed, {blocked} blocked"
            ));
        }
        if self.row(&sandbox).is_ok() {
            if let Err(e) = self.remove(&sandbox) {
                r.warning(format!("could not remove the build sandbox {sandbox}: {e}"));
            }
        }
        built
    }

    fn run_steps(
        &self,
        template: &str,
        info: &SandboxInfo,
        recipe: &LayeredRecipe,
        dir: &Path,
        r: &Replies,
    ) -> Result<(), DaemonError> {
        let control_path = self.control_path(&info.id);
        for (i, step) in recipe.steps.iter().enumerate() {
            r.progress(format!(
                "step {}/{}: {}",
                i + 1,
                recipe.steps.len(),
                step.name
            ));
            let exec = InitExec {
                argv: ["bash", "-euo", "pipefail", "-c", step.run.as_str()]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                env: self.sandbox_env(),
                user: Some(step.user.clone()),
                cwd: Some(dir.display().to_string()),
                stdio: InitStdio::Pipes {
                    stdin: false,
                    merge_stderr: true,
                },
                rows: 0,
                cols: 0,
            };
            let mut session = control::exec(&control_path, &exec)?;
            let out_read = session.stdio.pop().ok_or_else(|| {
                DaemonError::io(
                    "read a step's output",
                    std::io::Error::other("no pipe came back"),
                )
            })?;
            let mut tail = VecDeque::new();
            let limit = Duration::from_secs(step.timeout_minutes.saturating_mul(60));
            let end = step_output::follow(
                fs::File::from(out_read),
                move || session.wait(),
                limit,
                |line| {
                    r.progress(format!("  {line}"));
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                },
            )?;
            let blocked: Vec<String> = lock(&self.build_watch)
                .get(&info.name)
                .map(|f| {
                    f.iter()
                        .filter(|(_, (_, b))| *b > 0)
                        .map(|(h, _)| h.clone())
                        .collect()
                })
                .unwrap_or_default();
            let why = match end {
                StepEnd::Exited(0) if blocked.is_empty() => continue,
                StepEnd::Exited(_) if !blocked.is_empty() => format!(
                    "it reached {}, which the recipe does not list in allow_hosts (add it there if the template needs it)",
                    blocked.join(", ")
                ),
                StepEnd::Exited(code) => format!("it exited with {code}"),
                StepEnd::TimedOut => {
                    // Stopping the sandbox ends the step and all it started.
                    let _ = control::stop(&control_path, Duration::from_secs(2));
                    format!(
                        "it ran past its limit of {} minutes (timeout_minutes in the recipe)",
                        step.timeout_minutes
                    )
                }
            };
            let output: Vec<String> = tail.into_iter().collect();
            return Err(DaemonError::BadRequest(format!(
                "building template {template} failed at step {} ({}): {why}; its last output:\n{}\n{}",
                i + 1,
                step.name,
                output.join("\n"),
                self.build_log_lines(&info.name)
            )));
        }
        Ok(())
    }

    /// The network log of a build, for its error message.
    fn build_log_lines(&self, sandbox: &str) -> String {
        let rows = self.network_log(Some(sandbox), 50).unwrap_or_default();
        let mut text = String::from("network log of the build:");
        for e in rows {
            text.push_str(&format!(
                "\n  {} {} {}:{}{} -> {} ({})",
                e.time,
                e.method,
                e.host,
                e.port,
                e.path.unwrap_or_default(),
                e.decision,
                e.rule
            ));
        }
        text
    }

    /// Archives the stopped build sandbox's changes into the cache.
    fn write_build_layer(
        &self,
        info: &SandboxInfo,
        base: &ImageInfo,
        layer: &Path,
    ) -> Result<(), DaemonError> {
        let upper = self.paths.sandbox_state(&info.id).join("upper");
        let clamp = humantime::parse_rfc3339(&base.created)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let dir = layer.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".layer-")
            .tempfile_in(dir)
            .map_err(|e| DaemonError::io(format!("create a temp file in {}", dir.display()), e))?;
        let out = tmp
            .reopen()
            .map_err(|e| DaemonError::io("open the temp layer", e))?;
        crate::helpers::save_layer_mapped(&self.exe, &self.idmap, &upper, clamp, out)?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| DaemonError::io("write the template layer", e))?;
        tmp.persist(layer)
            .map_err(|e| DaemonError::io(format!("write {}", layer.display()), e.error))?;
        Ok(())
    }

    /// Called for every network log row: counts what build sandboxes fetch.
    pub(crate) fn watch_build(watch: &std::sync::Mutex<BuildWatch>, entry: &LogEntry) {
        if let Some(hosts) = lock(watch).get_mut(&entry.sandbox) {
            let counts = hosts.entry(entry.host.clone()).or_default();
            if entry.decision == "blocked" {
                counts.1 += 1;
            } else {
                counts.0 += 1;
            }
        }
    }
}

/// The recipe's files in a folder the build sandbox gets as its workspace:
/// world-readable, since the sandbox's root is not the host's.
fn recipe_folder(embedded: &Embedded) -> Result<tempfile::TempDir, DaemonError> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("moat-template-{}-", embedded.name))
        .tempdir()
        .map_err(|e| DaemonError::io("create a folder for the recipe", e))?;
    let io = |what: String, e| DaemonError::io(what, e);
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .map_err(|e| io(format!("chmod {}", dir.path().display()), e))?;
    for (file, text) in embedded.files {
        let path = dir.path().join(file);
        fs::write(&path, text).map_err(|e| io(format!("write {}", path.display()), e))?;
        let mode = if file.ends_with(".toml") {
            0o644
        } else {
            0o755
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| io(format!("chmod {}", path.display()), e))?;
    }
    Ok(dir)
}

fn digest_label(digest: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_DIGEST.to_string(), digest.to_string())])
}

fn random_hex() -> String {
    let bytes: [u8; 4] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn agents_come_from_the_recipes() {
        assert_eq!(agents(), vec!["shell", "openclaw", "claude", "codex"]);
        assert_eq!(agent("shell").unwrap().command, vec!["bash", "-l"]);
        assert_eq!(agent("claude").unwrap().template, "claude");
        let err = agent("node").unwrap_err().to_string();
        assert!(
            err.contains("agents are: shell, openclaw, claude, codex"),
            "{err}"
        );
        assert!(exists("shell") && exists("node") && !exists("nope"));
        assert_eq!(
            names(),
            vec!["shell", "node", "openclaw", "claude", "codex"]
        );
    }

    #[test]
    fn a_build_watch_counts_per_host() {
        let watch = std::sync::Mutex::new(BTreeMap::from([("b".to_string(), Fetched::new())]));
        let entry = |sandbox: &str, host: &str, decision: &str| LogEntry {
            time: String::new(),
            sandbox: sandbox.into(),
            method: "CONNECT".into(),
            host: host.into(),
            port: 443,
            path: None,
            rule: String::new(),
            decision: decision.into(),
            status: 200,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        };
        Daemon::watch_build(&watch, &entry("b", "registry.npmjs.org", "allowed"));
        Daemon::watch_build(&watch, &entry("b", "registry.npmjs.org", "allowed"));
        Daemon::watch_build(&watch, &entry("b", "evil.example", "blocked"));
        Daemon::watch_build(&watch, &entry("other", "x", "blocked"));
        let got = watch.lock().unwrap().get("b").cloned().unwrap();
        assert_eq!(
            got,
            BTreeMap::from([
                ("evil.example".to_string(), (0, 1)),
                ("registry.npmjs.org".to_string(), (2, 0)),
            ])
        );
    }
}

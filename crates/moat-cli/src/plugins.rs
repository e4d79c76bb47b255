//! moat as Docker CLI plugins: `moat plugins install` links `docker-sandbox`
//! and `docker-model` in Docker's plugin folder to this binary, so that the
//! `docker` client runs `docker sandbox …` and `docker model …` through moat.
//! The client runs a plugin as `docker-NAME docker-cli-plugin-metadata` to
//! learn about it, and as `docker-NAME NAME ARGS…` to run a command; the
//! binary tells these apart by the name it was started as.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Plugin executable, the moat command it stands for, and its one-line help.
const PLUGINS: [(&str, &str, &str); 2] = [
    (
        "docker-sandbox",
        "sandbox",
        "Run AI agents in sandboxes (moat)",
    ),
    (
        "docker-model",
        "model",
        "Run local models (moat's model runner)",
    ),
];

/// When started as a plugin, the command line moat should parse instead
/// (Err: the metadata was printed, exit with that code).
pub fn as_plugin(args: &[String]) -> Option<Result<Vec<String>, i32>> {
    let invoked = Path::new(args.first()?).file_name()?.to_str()?;
    let (_, command, about) = PLUGINS.iter().find(|(exe, _, _)| *exe == invoked)?;
    if args.get(1).map(String::as_str) == Some("docker-cli-plugin-metadata") {
        println!("{}", metadata(about));
        return Some(Err(0));
    }
    // The client passes the plugin's own name first (`docker-model model pull …`);
    // run by hand (`docker-model pull …`) it is missing.
    let rest = match args.get(1) {
        Some(first) if first == command => &args[2..],
        _ => &args[1..],
    };
    Some(Ok(["moat", command]
        .iter()
        .map(|s| s.to_string())
        .chain(rest.iter().cloned())
        .collect()))
}

fn metadata(about: &str) -> String {
    serde_json::json!({
        "SchemaVersion": "0.1.0",
        "Vendor": "moat",
        "Version": env!("CARGO_PKG_VERSION"),
        "ShortDescription": about,
    })
    .to_string()
}

/// Docker's per-user plugin folder: `$DOCKER_CONFIG/cli-plugins`, else `~/.docker/cli-plugins`.
pub fn default_dir() -> Result<PathBuf> {
    if let Some(config) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(config).join("cli-plugins"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("HOME is not set: name the plugin folder with --dir")?;
    Ok(PathBuf::from(home).join(".docker/cli-plugins"))
}

/// Links both plugins in `dir` to `exe`. A plugin of that name that is not
/// moat is kept unless `force` says to replace it.
pub fn install(dir: &Path, exe: &Path, force: bool) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let links: Vec<PathBuf> = PLUGINS.iter().map(|(name, _, _)| dir.join(name)).collect();
    // Every refusal before any change, so that a refusal leaves nothing half installed.
    for link in &links {
        if !force && link.symlink_metadata().is_ok() && !is_moat(link) {
            bail!(
                "{} exists and is not moat (Docker's own plugin?); move it away or pass --force to replace it",
                link.display()
            );
        }
    }
    for link in &links {
        if std::fs::read_link(link).is_ok_and(|target| target == exe) {
            continue;
        }
        // A new link renamed over the old file: the old plugin stays until
        // its replacement exists.
        let tmp = link.with_extension("moat-tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(exe, &tmp).with_context(|| format!("link {}", tmp.display()))?;
        std::fs::rename(&tmp, link).with_context(|| format!("link {}", link.display()))?;
    }
    Ok(links)
}

/// Removes the plugins that are moat from `dir`; others stay.
pub fn uninstall(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for (name, _, _) in PLUGINS {
        let link = dir.join(name);
        if link.symlink_metadata().is_ok() && is_moat(&link) {
            std::fs::remove_file(&link).with_context(|| format!("remove {}", link.display()))?;
            removed.push(link);
        }
    }
    Ok(removed)
}

/// A plugin is moat when it is a link to a binary named `moat`.
fn is_moat(link: &Path) -> bool {
    std::fs::read_link(link)
        .ok()
        .and_then(|t| t.file_name().map(|n| n == "moat"))
        .unwrap_or(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plugin_command_lines_become_moat_ones() {
        assert_eq!(
            as_plugin(&args(&[
                "/x/docker-sandbox",
                "sandbox",
                "create",
                "--name",
                "o",
                "shell",
                "."
            ])),
            Some(Ok(args(&[
                "moat", "sandbox", "create", "--name", "o", "shell", "."
            ])))
        );
        assert_eq!(
            as_plugin(&args(&["docker-model", "pull", "ai/smollm2"])),
            Some(Ok(args(&["moat", "model", "pull", "ai/smollm2"])))
        );
        assert_eq!(as_plugin(&args(&["moat", "sandbox", "ls"])), None);
        assert_eq!(
            as_plugin(&args(&["docker-model", "docker-cli-plugin-metadata"])),
            Some(Err(0))
        );
    }

    #[test]
    fn metadata_is_what_the_docker_client_expects() {
        let m: serde_json::Value = serde_json::from_str(&metadata("x")).unwrap();
        assert_eq!(m["SchemaVersion"], "0.1.0");
        assert_eq!(m["Vendor"], "moat");
        assert_eq!(m["ShortDescription"], "x");
    }

    #[test]
    fn install_links_keeps_foreign_plugins_and_uninstall_removes_only_moat() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("bin/moat");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        std::fs::write(&exe, "").unwrap();
        let plugins = dir.path().join("cli-plugins");
        let linked = install(&plugins, &exe, false).unwrap();
        assert_eq!(linked.len(), 2);
        assert_eq!(
            std::fs::read_link(plugins.join("docker-model")).unwrap(),
            exe
        );
        // Again: nothing changes.
        install(&plugins, &exe, false).unwrap();
        // Docker's own docker-model is kept unless forced.
        std::fs::remove_file(plugins.join("docker-model")).unwrap();
        std::fs::write(plugins.join("docker-model"), "docker's").unwrap();
        let err = install(&plugins, &exe, false).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        let removed = uninstall(&plugins).unwrap();
        assert_eq!(removed, vec![plugins.join("docker-sandbox")]);
        assert_eq!(
            std::fs::read_to_string(plugins.join("docker-model")).unwrap(),
            "docker's"
        );
        // A refusal links nothing, not even the plugin that was free.
        assert!(install(&plugins, &exe, false).is_err());
        assert!(plugins.join("docker-sandbox").symlink_metadata().is_err());
        install(&plugins, &exe, true).unwrap();
        assert_eq!(
            std::fs::read_link(plugins.join("docker-model")).unwrap(),
            exe
        );
    }
}

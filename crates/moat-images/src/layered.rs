//! Layered templates: recipes kept in the repository as `templates/NAME/`,
//! each a `template.toml` that names the template it starts from, the hosts
//! its build may reach, and the shell steps that make it, plus the files
//! those steps use (start scripts, helpers). They are compiled into the
//! binary, so a `moat` anywhere can build them; the daemon runs the steps
//! inside a sandbox (see `moat-daemon`'s `templates` module), and the layer
//! they leave is cached under the recipe's digest.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ImageError;

/// One template as written in `templates/NAME/template.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayeredRecipe {
    /// One line for `moat template ls`.
    pub description: String,
    /// The template it starts from (`shell`, or another layered one).
    pub from: String,
    /// Hosts the build may reach through the gateway (everything else is
    /// refused and named in the error). Same syntax as `--allow-host`.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// When set, the template is also an agent: `moat sandbox create NAME .`
    /// uses it, and `moat sandbox run` starts this command.
    #[serde(default)]
    pub agent: Option<Vec<String>>,
    /// Run in order, by `bash -euo pipefail -c`, in a folder holding the
    /// template's files.
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// What the step does, for progress and errors.
    pub name: String,
    pub run: String,
    /// Who runs it inside (default root, the sandbox's own).
    #[serde(default = "root")]
    pub user: String,
    /// How long it may run before the build is stopped and fails.
    #[serde(default = "thirty")]
    pub timeout_minutes: u64,
}

fn root() -> String {
    "root".into()
}

fn thirty() -> u64 {
    30
}

/// A recipe's folder as compiled in: its name and files (path, text).
pub struct Embedded {
    pub name: &'static str,
    pub files: &'static [(&'static str, &'static str)],
}

macro_rules! template_dir {
    ($name:literal: $($file:literal),* $(,)?) => {
        Embedded {
            name: $name,
            files: &[$(($file, include_str!(concat!("../../../templates/", $name, "/", $file)))),*],
        }
    };
}

/// Every layered template in the repository.
pub static EMBEDDED: &[Embedded] = &[
    template_dir!("node": "template.toml", "npm-fetch", "moat-runner"),
    template_dir!("openclaw": "template.toml", "start-openclaw", "openclaw.sh"),
    template_dir!("claude": "template.toml", "start-claude"),
    template_dir!("codex": "template.toml", "start-codex"),
];

impl Embedded {
    /// The parsed `template.toml`.
    pub fn recipe(&self) -> Result<LayeredRecipe, ImageError> {
        let text = self
            .files
            .iter()
            .find(|(path, _)| *path == "template.toml")
            .map(|(_, text)| *text)
            .unwrap_or_default();
        toml::from_str(text).map_err(|e| ImageError::TemplateBuild {
            name: self.name.to_string(),
            tail: format!("templates/{}/template.toml does not parse: {e}", self.name),
        })
    }

    /// sha256 (hex) over every file and the base's digest: a change to the
    /// recipe, its files or anything below it makes a new cache entry.
    pub fn digest(&self, base_digest: &str) -> String {
        let mut h = Sha256::new();
        let mut field = |value: &str| {
            h.update((value.len() as u64).to_le_bytes());
            h.update(value.as_bytes());
        };
        field("moat-layered-template-1");
        field(self.name);
        field(base_digest);
        for (path, text) in self.files {
            field(path);
            field(text);
        }
        hex::encode(h.finalize())
    }
}

/// The compiled-in template of that name.
pub fn find(name: &str) -> Option<&'static Embedded> {
    EMBEDDED.iter().find(|e| e.name == name)
}

/// The cached layer of a build: `<name>-<digest[..12]>.layer.tar`.
pub fn layer_name(name: &str, digest: &str) -> String {
    format!("{name}-{}.layer.tar", &digest[..12.min(digest.len())])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_recipe_parses_and_starts_from_a_known_template() {
        for e in EMBEDDED {
            let r = e.recipe().unwrap();
            assert!(!r.steps.is_empty(), "{} has no steps", e.name);
            assert!(
                r.from == "shell" || find(&r.from).is_some(),
                "{} starts from unknown {}",
                e.name,
                r.from
            );
            for (path, _) in e.files {
                assert!(!path.contains(".."), "{path}");
            }
        }
    }

    #[test]
    fn the_agents_are_the_ones_the_issue_names() {
        let agents: Vec<&str> = EMBEDDED
            .iter()
            .filter(|e| e.recipe().unwrap().agent.is_some())
            .map(|e| e.name)
            .collect();
        assert_eq!(agents, vec!["openclaw", "claude", "codex"]);
    }

    #[test]
    fn digest_covers_the_base_and_every_file() {
        let node = find("node").unwrap();
        let a = node.digest("base-1");
        assert_eq!(a, node.digest("base-1"));
        assert_ne!(a, node.digest("base-2"));
        assert_ne!(a, find("openclaw").unwrap().digest("base-1"));
        assert_eq!(
            layer_name("node", &a),
            format!("node-{}.layer.tar", &a[..12])
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = "description = \"x\"\nfrom = \"shell\"\nstep = []\nsteps = []\n";
        assert!(toml::from_str::<LayeredRecipe>(bad).is_err());
        let good =
            "description = \"x\"\nfrom = \"shell\"\n[[steps]]\nname = \"a\"\nrun = \"true\"\n";
        let r: LayeredRecipe = toml::from_str(good).unwrap();
        assert_eq!(r.steps[0].user, "root");
        assert_eq!(r.agent, None);
    }
}

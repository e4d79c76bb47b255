//! API keys the daemon holds: set with `moat secret set` into a file only
//! the daemon's user can read, or taken from the daemon's environment. They
//! go to the gateway and nowhere else: not to a sandbox, a log, an error or
//! `inspect`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use moat_gateway::credentials::{builtin_services, Credential, Service};
use serde::Serialize;

use crate::DaemonError;

/// Replaces `path` with `bytes` atomically, readable by the daemon's user alone.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DaemonError> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| DaemonError::io(format!("write {}", path.display()), e))
}

pub struct Secrets {
    path: PathBuf,
}

/// What `moat secret ls` shows: never the key.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SecretStatus {
    pub service: String,
    pub hosts: Vec<String>,
    /// `secret` (moat secret set), `env:NAME` (the daemon's environment), or empty.
    pub source: String,
}

impl Secrets {
    pub fn new(path: PathBuf) -> Secrets {
        Secrets { path }
    }

    fn load(&self) -> BTreeMap<String, String> {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn save(&self, map: &BTreeMap<String, String>) -> Result<(), DaemonError> {
        let text = serde_json::to_vec(map).map_err(|e| DaemonError::State(e.to_string()))?;
        write_private(&self.path, &text)
    }

    pub fn set(&self, services: &[Service], name: &str, key: &str) -> Result<(), DaemonError> {
        if !services.iter().any(|s| s.name == name) {
            let mut names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
            names.dedup();
            return Err(DaemonError::BadRequest(format!(
                "no service named {name:?}; services are: {}",
                names.join(", ")
            )));
        }
        let key = key.trim();
        if key.is_empty() || key.contains(['\r', '\n']) {
            return Err(DaemonError::BadRequest(
                "the key is empty or has a line break: pipe exactly the key".into(),
            ));
        }
        let mut map = self.load();
        map.insert(name.to_string(), key.to_string());
        self.save(&map)
    }

    pub fn remove(&self, name: &str) -> Result<(), DaemonError> {
        let mut map = self.load();
        if map.remove(name).is_none() {
            return Err(DaemonError::BadRequest(format!(
                "no secret is set for {name:?}; see `moat secret ls`"
            )));
        }
        self.save(&map)
    }

    /// Every service with its key, where one is known: a set secret first, then the environment.
    pub fn credentials(
        &self,
        services: &[Service],
        env: impl Fn(&str) -> Option<String>,
    ) -> Vec<(Credential, String)> {
        let stored = self.load();
        services
            .iter()
            .filter_map(|s| {
                let (key, source) = match stored.get(&s.name) {
                    Some(k) => (k.clone(), "secret".to_string()),
                    None => s.env.iter().find_map(|v| {
                        env(v)
                            .filter(|k| !k.is_empty())
                            .map(|k| (k, format!("env:{v}")))
                    })?,
                };
                Some((
                    Credential {
                        service: s.clone(),
                        key,
                    },
                    source,
                ))
            })
            .collect()
    }

    pub fn status(
        &self,
        services: &[Service],
        env: impl Fn(&str) -> Option<String>,
    ) -> Vec<SecretStatus> {
        let known = self.credentials(services, env);
        services
            .iter()
            .map(|s| SecretStatus {
                service: s.name.clone(),
                hosts: s.hosts.clone(),
                source: known
                    .iter()
                    .find(|(c, _)| c.service == *s)
                    .map(|(_, src)| src.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// The built-in services and those the configuration adds.
pub fn all_services(extra: &[Service]) -> Vec<Service> {
    builtin_services()
        .into_iter()
        .chain(extra.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_secret_wins_over_the_environment_and_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let s = Secrets::new(dir.path().join("secrets.json"));
        let services = all_services(&[]);
        let env = |v: &str| (v == "OPENAI_API_KEY").then(|| "sk-env".to_string());
        s.set(&services, "openai", "sk-stored\n").unwrap();
        assert!(s.set(&services, "nope", "x").is_err());
        let creds = s.credentials(&services, env);
        assert_eq!(
            creds
                .iter()
                .map(|(c, src)| (c.service.name.as_str(), c.key.as_str(), src.as_str()))
                .collect::<Vec<_>>(),
            vec![("openai", "sk-stored", "secret")]
        );
        let status = s.status(&services, env);
        let text = serde_json::to_string(&status).unwrap();
        assert!(!text.contains("sk-"), "{text}");
        s.remove("openai").unwrap();
        assert_eq!(s.credentials(&services, env)[0].1, "env:OPENAI_API_KEY");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("secrets.json"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}

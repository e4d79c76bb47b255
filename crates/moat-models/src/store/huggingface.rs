//! Pulls from Hugging Face, as `docker model pull hf.co/ORG/REPO[:QUANT]`
//! does: the repository's file list comes from the Hub's API, the GGUF file
//! (or every shard of a split one) whose name carries the quantization is
//! downloaded, resuming what a broken pull left, checked against the SHA-256
//! the Hub lists for it, and packaged like `moat model package --gguf` would.
//! Without a tag, `Q4_K_M` is taken when there is one, else the first GGUF.
//!
//! The Hub is `https://huggingface.co` unless `HF_ENDPOINT` names another
//! (a mirror, or a local server in tests); `HF_TOKEN` is sent to it for
//! private and gated repositories, as the Hub's own tools do.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Model, PROGRESS_EVERY};
use super::{ModelReference, ModelStore, RegistryOptions, Staged, StoreError, Transfer};

/// The quantization taken when the reference has no tag, as DMR does.
const DEFAULT_QUANT: &str = "Q4_K_M";
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The names a Hugging Face reference may start with.
const HUB_HOSTS: [&str; 2] = ["hf.co/", "huggingface.co/"];

/// Where the Hub is and the token to show it.
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    pub endpoint: String,
    pub token: Option<String>,
}

impl HubConfig {
    /// `HF_ENDPOINT` and `HF_TOKEN`, the variables the Hub's own clients read.
    pub fn from_env() -> HubConfig {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        HubConfig {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
        }
    }
}

/// `hf.co/ORG/REPO[:QUANT]`, split.
#[derive(Debug, Clone, PartialEq)]
pub struct HubReference {
    /// `ORG/REPO` as written (the Hub's names keep their case).
    pub repo: String,
    pub quant: Option<String>,
}

impl HubReference {
    /// `None` when `s` does not name the Hub.
    pub fn parse(s: &str) -> Option<Result<HubReference, StoreError>> {
        let rest = HUB_HOSTS.iter().find_map(|h| s.strip_prefix(h))?;
        if rest.contains('@') {
            // `NAME@sha256:…` names a stored model by its id, not the Hub.
            return None;
        }
        let (repo, quant) = match rest.rsplit_once(':') {
            // `latest` is what a pull without a tag is stored as: the default.
            Some((repo, q)) if q.eq_ignore_ascii_case("latest") => (repo, None),
            Some((repo, q)) => (repo, Some(q.to_ascii_uppercase())),
            None => (rest, None),
        };
        let bad = |reason: &str| {
            StoreError::InvalidReference {
            reference: s.to_string(),
            reason: format!("{reason}; write hf.co/ORG/REPO[:QUANT], e.g. hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
        }
        };
        let name_ok = |part: &str| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match repo.split('/').collect::<Vec<_>>().as_slice() {
            [org, name] if name_ok(org) && name_ok(name) => {}
            _ => return Some(Err(bad("a Hugging Face repository is ORG/REPO"))),
        }
        if let Some(q) = &quant {
            if !name_ok(q) {
                return Some(Err(bad("the tag names a quantization, e.g. Q4_K_M")));
            }
        }
        Some(Ok(HubReference {
            repo: repo.to_string(),
            quant,
        }))
    }

    /// The name the model is stored under: `hf.co/org/repo:QUANT`, the
    /// repository in lower case as OCI names are (the Hub ignores case).
    pub fn tag(&self) -> String {
        format!(
            "hf.co/{}:{}",
            self.repo.to_lowercase(),
            self.quant.as_deref().unwrap_or("latest")
        )
    }
}

/// One file of the repository, as the Hub's tree API lists it.
#[derive(Debug, Clone, Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    lfs: Option<LfsInfo>,
}

#[derive(Debug, Clone, Deserialize)]
struct LfsInfo {
    /// The SHA-256 of the file's bytes.
    oid: String,
    size: u64,
}

/// A GGUF file to fetch: its path in the repository, size and SHA-256.
#[derive(Debug, Clone, PartialEq)]
struct HubFile {
    path: String,
    size: u64,
    sha256: Option<String>,
}

impl ModelStore {
    /// Pulls `hf.co/ORG/REPO[:QUANT]` from the Hub `hub` names.
    pub(super) fn pull_from_hub(
        &self,
        reference: &HubReference,
        hub: &HubConfig,
        opts: &RegistryOptions,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<Model, StoreError> {
        let target = ModelReference::parse(&reference.tag())?;
        let client = Client::new(hub, opts, &reference.repo)?;
        progress(Transfer::Step(format!(
            "Listing the files of {} on {}",
            reference.repo, hub.endpoint
        )));
        let tree = client.tree()?;
        let files = choose_files(&tree, reference.quant.as_deref()).map_err(|reason| {
            client.error(format!(
                "{reason} (pull one with hf.co/{}:QUANT)",
                reference.repo
            ))
        })?;
        if let Some(model) = self.up_to_date(&target, &files) {
            progress(Transfer::Step(format!("{target} is up to date")));
            return Ok(model);
        }
        // Every file first, kept as it arrives: a shard that breaks off
        // leaves the ones before it for the next pull.
        let mut fetched = Vec::new();
        for file in &files {
            fetched.push(self.fetch(&client, file, progress)?);
        }
        let staged = fetched
            .into_iter()
            .map(Fetched::into_staged)
            .collect::<Result<Vec<_>, _>>()?;
        self.package_staged(staged, Vec::new(), None, None, &target)
    }

    /// The model `target` names, when its weights are exactly `files`.
    fn up_to_date(&self, target: &ModelReference, files: &[HubFile]) -> Option<Model> {
        let model = self.get(&target.to_string()).ok()?;
        let stored: Vec<String> = model
            .gguf_paths
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let listed: Vec<String> = files.iter().filter_map(|f| f.sha256.clone()).collect();
        (listed.len() == files.len() && listed == stored).then_some(model)
    }

    /// Downloads one file into `incoming/`, continuing a partial download of
    /// the same bytes, and checks its size and SHA-256.
    fn fetch(
        &self,
        client: &Client,
        file: &HubFile,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<Fetched, StoreError> {
        // choose_files took only plain paths: the name is safe as it is.
        let name = file_name(&file.path).to_string();
        // A file known by its hash is downloaded under that name, so that a
        // broken pull is resumed by the next; others start over each time.
        let key = match &file.sha256 {
            Some(sha) => format!("hf-{sha}.part"),
            None => format!("hf-{}-{}.part", std::process::id(), sanitize(&name)),
        };
        let part = self.incoming_dir().join(key);
        // Two pulls of one file at once would write into each other's bytes.
        let lock_path = part.with_extension("lock");
        let lock = File::create(&lock_path)
            .map_err(|e| StoreError::io(format!("create {}", lock_path.display()), e))?;
        let _lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|_| {
            client.error(format!(
                "{name} is being downloaded by another pull; wait for it to finish"
            ))
        })?;
        if file.sha256.is_none() {
            let _ = fs::remove_file(&part);
        }
        if let Some(sha) = &file.sha256 {
            let stored = self.blob_path(&format!("sha256:{sha}"))?;
            if fs::metadata(&stored).is_ok_and(|m| m.len() == file.size) {
                // Already in the store (another tag): link it, download nothing.
                let _ = fs::remove_file(&part);
                fs::hard_link(&stored, &part)
                    .or_else(|_| fs::copy(&stored, &part).map(|_| ()))
                    .map_err(|e| StoreError::io(format!("copy {name} in the store"), e))?;
                return Ok(Fetched {
                    part,
                    name,
                    sha: sha.clone(),
                    size: file.size,
                });
            }
        }
        let id = file
            .sha256
            .as_deref()
            .map(|s| s[..12.min(s.len())].to_string())
            .unwrap_or_else(|| name.clone());
        let mut hasher = Sha256::new();
        let mut have = hash_existing(&part, &mut hasher)?;
        if have > file.size {
            let _ = fs::remove_file(&part);
            hasher = Sha256::new();
            have = 0;
        }
        if have > 0 && have < file.size {
            progress(Transfer::Step(format!(
                "{id}: resuming at {have} of {} bytes",
                file.size
            )));
        }
        if have < file.size || file.size == 0 {
            have = client.download(&file.path, file.size, &part, have, &mut hasher, &|done| {
                progress(Transfer::Bytes {
                    id: id.clone(),
                    done,
                    total: file.size,
                })
            })?;
        }
        progress(Transfer::Bytes {
            id: id.clone(),
            done: have,
            total: file.size.max(have),
        });
        if have < file.size {
            // The body ended early but cleanly: what came is kept to resume.
            return Err(client.error(format!(
                "the download of {name} ended after {have} of {} bytes; pull again to resume it",
                file.size
            )));
        }
        let digest = hex::encode(hasher.finalize());
        if have != file.size || file.sha256.as_ref().is_some_and(|s| *s != digest) {
            let _ = fs::remove_file(&part);
            return Err(client.error(format!(
                "{name} arrived as {have} bytes with SHA-256 {digest}, but the Hub lists {} bytes{}; the partial file was removed, pull again",
                file.size,
                file.sha256.as_ref().map(|s| format!(" with SHA-256 {s}")).unwrap_or_default()
            )));
        }
        Ok(Fetched {
            part,
            name,
            sha: digest,
            size: have,
        })
    }
}

/// A whole, checked download in `incoming/`.
struct Fetched {
    part: PathBuf,
    name: String,
    sha: String,
    size: u64,
}

impl Fetched {
    /// The download as a staged blob, removed if the package fails.
    fn into_staged(self) -> Result<Staged, StoreError> {
        let file =
            File::open(&self.part).map_err(|e| StoreError::io(format!("open {}", self.name), e))?;
        let path = tempfile::TempPath::try_from_path(&self.part)
            .map_err(|e| StoreError::io(format!("keep {}", self.part.display()), e))?;
        Ok(Staged {
            file: tempfile::NamedTempFile::from_parts(file, path),
            name: self.name,
            digest: format!("sha256:{}", self.sha),
            size: self.size,
        })
    }
}

/// Feeds what an earlier pull left of a file to `hasher`; its length.
fn hash_existing(part: &Path, hasher: &mut Sha256) -> Result<u64, StoreError> {
    let mut file = match File::open(part) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StoreError::io(format!("open {}", part.display()), e)),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => {
                hasher.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io(format!("read {}", part.display()), e)),
        }
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The GGUF files of one quantization: every shard of a split model, in
/// order. `Err` says what the repository has instead.
fn choose_files(tree: &[TreeEntry], quant: Option<&str>) -> Result<Vec<HubFile>, String> {
    let ggufs: Vec<&TreeEntry> = tree
        .iter()
        .filter(|e| e.kind == "file" && e.path.to_ascii_lowercase().ends_with(".gguf"))
        // A path that could leave the repository's URL space is not fetched.
        .filter(|e| plain_path(&e.path))
        // Vision projectors ride along in many repositories; they are not
        // the model.
        .filter(|e| {
            !file_name(&e.path)
                .to_ascii_lowercase()
                .starts_with("mmproj")
        })
        .collect();
    if ggufs.is_empty() {
        return Err("the repository has no GGUF file; only GGUF models run here".to_string());
    }
    // Files grouped by model: the shards of a split model are one group.
    let mut groups: Vec<(String, Vec<&TreeEntry>)> = Vec::new();
    for e in &ggufs {
        let key = group_key(&e.path);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(e),
            None => groups.push((key, vec![e])),
        }
    }
    let chosen = match quant {
        Some(q) => groups.iter().find(|(k, _)| names_quant(k, q)),
        None => groups
            .iter()
            .find(|(k, _)| names_quant(k, DEFAULT_QUANT))
            .or_else(|| groups.first()),
    };
    let Some((_, members)) = chosen else {
        let available: Vec<String> = groups.iter().map(|(k, _)| quant_label(k)).collect();
        return Err(format!(
            "the repository has no GGUF file for {}; it has {}",
            quant.unwrap_or(DEFAULT_QUANT),
            available.join(", ")
        ));
    };
    let mut members = members.clone();
    members.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(members
        .into_iter()
        .map(|e| HubFile {
            path: e.path.clone(),
            size: e.lfs.as_ref().map(|l| l.size).unwrap_or(e.size),
            sha256: e
                .lfs
                .as_ref()
                .map(|l| l.oid.to_ascii_lowercase())
                .filter(|o| o.len() == 64 && o.bytes().all(|b| b.is_ascii_hexdigit())),
        })
        .collect())
}

/// Segments of `[A-Za-z0-9._+-]` that are not `.` or `..`, joined by `/`.
fn plain_path(path: &str) -> bool {
    path.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
    })
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The path without `.gguf` and without a `-0000N-of-0000M` shard suffix.
fn group_key(path: &str) -> String {
    let stem = &path[..path.len() - ".gguf".len()];
    if let Some((head, tail)) = stem.rsplit_once("-of-") {
        if let Some((base, no)) = head.rsplit_once('-') {
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if digits(no) && digits(tail) {
                return base.to_string();
            }
        }
    }
    stem.to_string()
}

/// Whether a file name carries the quantization `quant` as a whole word:
/// `Q4_K` names `x.Q4_K.gguf` but not `x.Q4_K_M.gguf`; case is ignored.
fn names_quant(key: &str, quant: &str) -> bool {
    let name = file_name(key).to_ascii_uppercase();
    let quant = quant.to_ascii_uppercase();
    let is_sep = |c: Option<char>| c.is_none_or(|c| matches!(c, '.' | '-' | '/'));
    name.match_indices(&quant).any(|(at, _)| {
        let before = name[..at].chars().next_back();
        let after = name[at + quant.len()..].chars().next();
        (is_sep(before) || before == Some('_')) && is_sep(after)
    })
}

/// `Q4_K_M` for `Llama-3.2-1B-Instruct-Q4_K_M`: the last word that looks
/// like a quantization, else the file name.
fn quant_label(key: &str) -> String {
    let name = file_name(key);
    name.split(['.', '-'])
        .rev()
        .find(|w| {
            let u = w.to_ascii_uppercase();
            let rest = u
                .strip_prefix("IQ")
                .or_else(|| u.strip_prefix("BF"))
                .or_else(|| u.strip_prefix('Q'))
                .or_else(|| u.strip_prefix('F'));
            rest.is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(str::to_string)
        .unwrap_or_else(|| name.to_string())
}

/// The Hub's HTTP API for one repository.
struct Client {
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    endpoint: String,
    token: Option<String>,
    repo: String,
}

impl Client {
    fn new(hub: &HubConfig, opts: &RegistryOptions, repo: &str) -> Result<Client, StoreError> {
        // reqwest is built without a default crypto provider; the registry
        // client and the gateway use ring too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut certs = Vec::new();
        for pem in &opts.extra_ca_pem {
            certs.push(
                reqwest::Certificate::from_pem(pem).map_err(|e| StoreError::Hub {
                    repo: repo.to_string(),
                    reason: format!("an extra CA certificate does not parse: {e}"),
                })?,
            );
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("moat/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(120))
            .tls_certs_merge(certs)
            .build()
            .map_err(|e| StoreError::Hub {
                repo: repo.to_string(),
                reason: format!("could not start an HTTP client: {e}"),
            })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("start the Hugging Face client", e))?;
        Ok(Client {
            http,
            runtime,
            endpoint: hub.endpoint.clone(),
            token: hub.token.clone(),
            repo: repo.to_string(),
        })
    }

    fn error(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Hub {
            repo: self.repo.clone(),
            reason: reason.into(),
        }
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let request = self.http.get(url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Turns a refusal into a message that says what to do.
    fn refused(&self, what: &str, status: reqwest::StatusCode) -> StoreError {
        let hint = match status.as_u16() {
            401 | 403 if self.token.is_some() => {
                "the token in HF_TOKEN was refused; check that it can read this repository"
            }
            401 | 403 => {
                "it is private or gated, or does not exist; check the name, or set HF_TOKEN in the daemon's environment"
            }
            404 => "check the repository's name and that the file is still there",
            429 => "the Hub limits requests; wait a minute and pull again",
            _ => "try again later",
        };
        self.error(format!("{what} answered {status}: {hint}"))
    }

    fn unreachable(&self, e: reqwest::Error) -> StoreError {
        self.error(format!(
            "{} could not be reached: {e}; check the network, or point HF_ENDPOINT at a mirror",
            self.endpoint
        ))
    }

    /// Every file of the repository's main branch, following the Hub's
    /// pagination.
    fn tree(&self) -> Result<Vec<TreeEntry>, StoreError> {
        let mut url = Some(format!(
            "{}/api/models/{}/tree/main?recursive=true",
            self.endpoint, self.repo
        ));
        let mut entries = Vec::new();
        self.runtime.block_on(async {
            while let Some(at) = url.take() {
                let response = self
                    .get(&at)
                    .send()
                    .await
                    .map_err(|e| self.unreachable(e))?;
                if !response.status().is_success() {
                    return Err(self.refused("the file list", response.status()));
                }
                url = next_page(response.headers())
                    .filter(|next| next.starts_with(&format!("{}/", self.endpoint)));
                let page: Vec<TreeEntry> = response
                    .json()
                    .await
                    .map_err(|e| self.error(format!("the Hub's file list does not parse: {e}")))?;
                entries.extend(page);
            }
            Ok(entries)
        })
    }

    /// Appends `path`'s bytes from `offset` on to `part`, feeding them to
    /// `hasher`; the length `part` then has. A server that ignores the range
    /// sends the whole file, and the download starts over.
    fn download(
        &self,
        path: &str,
        limit: u64,
        part: &Path,
        offset: u64,
        hasher: &mut Sha256,
        progress: &dyn Fn(u64),
    ) -> Result<u64, StoreError> {
        let url = format!("{}/{}/resolve/main/{}", self.endpoint, self.repo, path);
        let name = file_name(path);
        let write_err = |e| StoreError::io(format!("write {name} in the model store"), e);
        self.runtime.block_on(async {
            let mut request = self.get(&url);
            if offset > 0 {
                request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
            }
            let mut response = request.send().await.map_err(|e| self.unreachable(e))?;
            let status = response.status();
            let (mut out, mut have) = match status.as_u16() {
                206 if offset > 0
                    && content_range_start(response.headers()) == Some(offset) =>
                {
                    let f = OpenOptions::new().append(true).open(part).map_err(write_err)?;
                    (f, offset)
                }
                200 => {
                    *hasher = Sha256::new();
                    (File::create(part).map_err(write_err)?, 0)
                }
                _ => return Err(self.refused(name, status)),
            };
            let mut last = Instant::now();
            loop {
                let chunk = match response.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(e) => {
                        // What arrived stays for the next pull to resume.
                        let _ = out.sync_all();
                        return Err(self.error(format!(
                            "the download of {name} broke off after {have} bytes ({e}); pull again to resume it"
                        )));
                    }
                };
                out.write_all(&chunk).map_err(write_err)?;
                hasher.update(&chunk);
                have += chunk.len() as u64;
                if have > limit {
                    drop(out);
                    let _ = fs::remove_file(part);
                    return Err(self.error(format!(
                        "{name} is larger than the {limit} bytes the Hub lists; the download was removed"
                    )));
                }
                if last.elapsed() >= PROGRESS_EVERY {
                    last = Instant::now();
                    progress(have);
                }
            }
            out.sync_all().map_err(write_err)?;
            Ok(have)
        })
    }
}

/// Where a 206 answer's bytes start (`Content-Range: bytes START-END/SIZE`).
fn content_range_start(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = headers.get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    value
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// The `rel="next"` URL of a `Link` header, as the Hub paginates.
fn next_page(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> TreeEntry {
        TreeEntry {
            kind: "file".into(),
            path: path.into(),
            size: 10,
            lfs: Some(LfsInfo {
                oid: "ab".repeat(32),
                size: 10,
            }),
        }
    }

    fn chosen(paths: &[&str], quant: Option<&str>) -> Result<Vec<String>, String> {
        let tree: Vec<TreeEntry> = paths.iter().map(|p| entry(p)).collect();
        choose_files(&tree, quant).map(|fs| fs.into_iter().map(|f| f.path).collect())
    }

    #[test]
    fn references_name_the_hub_and_a_quantization() {
        let r = HubReference::parse("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_S");
        assert_eq!(
            r.map(|r| r.ok()),
            Some(Some(HubReference {
                repo: "bartowski/Llama-3.2-1B-Instruct-GGUF".into(),
                quant: Some("Q4_K_S".into())
            }))
        );
        let r = HubReference::parse("huggingface.co/Org/Repo").and_then(|r| r.ok());
        assert_eq!(
            r.as_ref().map(HubReference::tag).as_deref(),
            Some("hf.co/org/repo:latest")
        );
        assert!(HubReference::parse("ai/smollm2").is_none());
        let latest = HubReference::parse("hf.co/Org/Repo:latest").and_then(|r| r.ok());
        assert_eq!(
            latest.map(|r| r.quant),
            Some(None),
            ":latest is the default"
        );
        let lower = HubReference::parse("hf.co/o/r:q4_k_m").and_then(|r| r.ok());
        assert_eq!(lower.map(|r| r.tag()).as_deref(), Some("hf.co/o/r:Q4_K_M"));
        assert!(matches!(
            HubReference::parse("hf.co/only-org"),
            Some(Err(_))
        ));
        assert!(matches!(HubReference::parse("hf.co/a/b/c"), Some(Err(_))));
        assert!(matches!(HubReference::parse("hf.co/a/../b"), Some(Err(_))));
    }

    #[test]
    fn the_quantization_is_matched_as_a_whole_word() {
        let files = [
            "README.md",
            "Model-Q4_K.gguf",
            "Model-Q4_K_M.gguf",
            "Model-Q8_0.gguf",
            "mmproj-Model-f16.gguf",
        ];
        assert_eq!(
            chosen(&files, Some("q4_k")),
            Ok(vec!["Model-Q4_K.gguf".to_string()])
        );
        assert_eq!(
            chosen(&files, None),
            Ok(vec!["Model-Q4_K_M.gguf".to_string()])
        );
        assert_eq!(
            chosen(&files, Some("Q8_0")),
            Ok(vec!["Model-Q8_0.gguf".to_string()])
        );
        assert_eq!(
            chosen(&files, Some("Q2_K")),
            Err("the repository has no GGUF file for Q2_K; it has Q4_K, Q4_K_M, Q8_0".to_string())
        );
    }

    #[test]
    fn paths_that_could_leave_the_repository_are_not_fetched() {
        for bad in [
            "../x.Q4_0.gguf",
            "/x.Q4_0.gguf",
            "a//x.Q4_0.gguf",
            "a/./x.Q4_0.gguf",
            "x?.Q4_0.gguf",
            "x%2F.Q4_0.gguf",
        ] {
            assert!(chosen(&[bad], None).is_err(), "{bad} was taken");
        }
        assert!(chosen(&["sub/x+y.Q4_0.gguf"], None).is_ok());
    }

    #[test]
    fn without_q4_k_m_the_first_gguf_is_taken() {
        assert_eq!(
            chosen(&["b.Q8_0.gguf", "a.Q5_K_S.gguf"], None),
            Ok(vec!["b.Q8_0.gguf".to_string()])
        );
        assert!(chosen(&["README.md"], None).is_err());
    }

    #[test]
    fn the_shards_of_a_split_model_come_together_in_order() {
        let files = [
            "Q4_K_M/Big-Q4_K_M-00002-of-00002.gguf",
            "Q4_K_M/Big-Q4_K_M-00001-of-00002.gguf",
            "Big-Q8_0.gguf",
        ];
        assert_eq!(
            chosen(&files, Some("Q4_K_M")),
            Ok(vec![
                "Q4_K_M/Big-Q4_K_M-00001-of-00002.gguf".to_string(),
                "Q4_K_M/Big-Q4_K_M-00002-of-00002.gguf".to_string()
            ])
        );
    }

    #[test]
    fn pagination_follows_the_next_link() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::LINK,
            "<https://hf.co/api/models/a/b/tree/main?cursor=x>; rel=\"next\""
                .parse()
                .expect("header"),
        );
        assert_eq!(
            next_page(&headers).as_deref(),
            Some("https://hf.co/api/models/a/b/tree/main?cursor=x")
        );
        assert_eq!(next_page(&reqwest::header::HeaderMap::new()), None);
    }
}

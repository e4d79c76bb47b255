//! The prompt cache on disk: the KV state of a slot's token prefix, saved
//! when a model's worker ends (keep-alive, `unload`, the daemon's end) and
//! restored when a later worker of the same model gets a prompt that
//! starts with that prefix, so that an agent's long fixed prompt is read
//! once, not once per load. llama-server has a manual slot save/restore;
//! Ollama and Docker Model Runner keep nothing across unloads.
//!
//! One folder per model (named by its digest) under the cache's root, one
//! file per saved prefix, named by a hash of the model, the context
//! settings and the tokens. A file is:
//!
//! ```text
//! MAGIC (8 bytes) | header length (u32 LE) | header (JSON)
//! | tokens (i32 LE each) | payload (llama.cpp's sequence state)
//! ```
//!
//! The header names the llama.cpp build, the model, the context settings,
//! the sizes, and a SHA-256 of tokens and payload. Nothing reaches
//! llama.cpp until all of them match: a truncated, corrupted or foreign
//! file is removed and logged (once: it is gone after that), and the
//! request is served by reading its prompt as if there were no cache.
//!
//! Writes go to a temporary file that is renamed into place, under an
//! exclusive flock of the model's folder, so two workers of a model never
//! write one file at once and a reader never sees half a file. The whole
//! cache is bounded: after a save, the least recently used files (by
//! modification time, which a restore renews) go until it fits.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::protocol::PromptCacheSpec;
use super::worker::common_prefix;

const MAGIC: &[u8; 8] = b"MOATKV\0\x01";

/// The llama.cpp the state bytes come from. Its sequence-state layout may
/// change between releases, so a file written by another build is never
/// read; `llama_cpp_build_matches_the_lock_file` keeps this in step with
/// the pinned crate.
pub const LLAMA_CPP_BUILD: &str = "llama-cpp-sys-2 0.1.161";

/// Prefixes shorter than this are not worth a file or a restore: reading
/// them again costs about what reading the file does.
pub const MIN_TOKENS: usize = 64;

/// A header larger than this is not one of ours.
const MAX_HEADER: u32 = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Header {
    build: String,
    model: String,
    settings: String,
    tokens: u64,
    payload: u64,
    /// SHA-256 of the token bytes and then the payload, hex.
    sha256: String,
}

/// One saved prefix, as the index knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    pub tokens: Vec<i32>,
}

/// The cache of one model with one set of context settings.
pub struct PromptCache {
    root: PathBuf,
    dir: PathBuf,
    max_bytes: u64,
    model: String,
    settings: String,
    entries: Vec<Entry>,
}

impl PromptCache {
    /// Index the model's saved prefixes: headers and tokens only. Files
    /// that are not valid for this model and build are removed; those of
    /// other context settings are left for a worker that has them.
    pub fn open(spec: &PromptCacheSpec, settings: &str) -> PromptCache {
        let dir = spec.root.join(folder_name(&spec.model));
        let mut cache = PromptCache {
            root: spec.root.clone(),
            dir,
            max_bytes: spec.max_bytes,
            model: spec.model.clone(),
            settings: settings.to_string(),
            entries: Vec::new(),
        };
        let Ok(read) = fs::read_dir(&cache.dir) else {
            return cache;
        };
        let _lock = lock_folder(&cache.dir, FlockArg::LockShared);
        for item in read.flatten() {
            let path = item.path();
            if !is_entry(&path) {
                continue;
            }
            match cache.read_index(&path) {
                Ok(Some(tokens)) => cache.entries.push(Entry { path, tokens }),
                Ok(None) => {}
                Err(why) => cache.discard(&path, &why),
            }
        }
        cache
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The saved prefix sharing the most leading tokens with `prompt`, and
    /// how many it shares; none under [`MIN_TOKENS`].
    pub fn best(&self, prompt: &[i32]) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt)))
            .filter(|&(_, n)| n >= MIN_TOKENS)
            .max_by_key(|&(_, n)| n)
    }

    /// The checked payload of entry `index`; `None` (and the file gone)
    /// when it no longer matches its header.
    pub fn payload(&mut self, index: usize) -> Option<Vec<u8>> {
        let path = self.entries.get(index)?.path.clone();
        match self.read_payload(&path, &self.entries[index].tokens) {
            Ok(bytes) => {
                // A restore makes the prefix recently used.
                touch(&path);
                Some(bytes)
            }
            Err(why) => {
                self.forget(index, &why);
                None
            }
        }
    }

    /// Remove entry `index` and its file, saying why in the model's log.
    pub fn forget(&mut self, index: usize, why: &str) {
        if index < self.entries.len() {
            let entry = self.entries.remove(index);
            self.discard(&entry.path, why);
        }
    }

    /// Save a prefix; false when it is larger than the whole bound (and
    /// not saved). One already saved is only made recent. A failure (a
    /// full disk) leaves no file behind and is the caller's to log.
    pub fn save(&mut self, tokens: &[i32], payload: &[u8]) -> Result<bool, String> {
        if payload.len() as u64 > self.max_bytes {
            return Ok(false);
        }
        fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let _lock = lock_folder(&self.dir, FlockArg::LockExclusive);
        let path = self
            .dir
            .join(file_name(&self.model, &self.settings, tokens));
        if path.exists() {
            touch(&path);
            return Ok(true);
        }
        // Under the lock, any other temporary file is a dead writer's.
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for item in rd.flatten() {
                if item.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_file(item.path());
                }
            }
        }
        let tmp = self.dir.join(format!(".tmp-{}", std::process::id()));
        let written = File::create(&tmp)
            .and_then(|mut f| {
                self.write_entry(&mut f, tokens, payload)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(format!(
                "the prompt cache could not save {} tokens to {}: {e} (free disk space there, or lower [models] prompt_cache_size)",
                tokens.len(),
                self.dir.display()
            ));
        }
        self.entries.push(Entry {
            path,
            tokens: tokens.to_vec(),
        });
        Ok(true)
    }

    /// Remove the least recently used files of every model until the
    /// whole cache fits its bound; returns the bytes it then holds.
    pub fn evict(&mut self) -> u64 {
        let mut files = all_entries(&self.root);
        files.sort_by_key(|f| f.1);
        let mut total: u64 = files.iter().map(|f| f.2).sum();
        for (path, _, size) in files {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= size;
                self.entries.retain(|e| e.path != path);
            }
        }
        total
    }

    fn write_entry(&self, w: &mut impl Write, tokens: &[i32], payload: &[u8]) -> io::Result<()> {
        let token_bytes = token_bytes(tokens);
        let header = Header {
            build: LLAMA_CPP_BUILD.into(),
            model: self.model.clone(),
            settings: self.settings.clone(),
            tokens: tokens.len() as u64,
            payload: payload.len() as u64,
            sha256: checksum(&token_bytes, payload),
        };
        let json = serde_json::to_vec(&header).map_err(io::Error::other)?;
        w.write_all(MAGIC)?;
        w.write_all(&(json.len() as u32).to_le_bytes())?;
        w.write_all(&json)?;
        w.write_all(&token_bytes)?;
        w.write_all(payload)?;
        w.flush()
    }

    /// The header and tokens of a file: `None` when it is valid but for
    /// other context settings; an error when it is not valid at all.
    fn read_index(&self, path: &Path) -> Result<Option<Vec<i32>>, String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let header = read_header(&mut f)?;
        if header.build != LLAMA_CPP_BUILD {
            return Err(format!("written by {}", header.build));
        }
        if header.model != self.model {
            return Err(format!("of another model ({})", header.model));
        }
        let header_end = f.stream_position().map_err(|e| e.to_string())?;
        let want = header
            .tokens
            .checked_mul(4)
            .and_then(|t| t.checked_add(header.payload))
            .and_then(|n| n.checked_add(header_end))
            .ok_or("sizes that overflow")?;
        let have = f.metadata().map_err(|e| e.to_string())?.len();
        if have != want {
            return Err(format!("{have} bytes where its header says {want}"));
        }
        if header.settings != self.settings {
            return Ok(None);
        }
        let mut raw = vec![0u8; header.tokens as usize * 4];
        f.read_exact(&mut raw).map_err(|e| e.to_string())?;
        let tokens = raw
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Some(tokens))
    }

    fn read_payload(&self, path: &Path, tokens: &[i32]) -> Result<Vec<u8>, String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let header = read_header(&mut f)?;
        if header.build != LLAMA_CPP_BUILD
            || header.model != self.model
            || header.settings != self.settings
            || header.tokens != tokens.len() as u64
        {
            return Err("its header changed since it was indexed".into());
        }
        let mut raw = vec![0u8; tokens.len() * 4];
        f.read_exact(&mut raw)
            .map_err(|e| format!("truncated: {e}"))?;
        if raw != token_bytes(tokens) {
            return Err("its tokens changed since it was indexed".into());
        }
        let mut payload = Vec::new();
        f.take(header.payload + 1)
            .read_to_end(&mut payload)
            .map_err(|e| e.to_string())?;
        if payload.len() as u64 != header.payload {
            return Err(format!(
                "{} bytes of state where its header says {}",
                payload.len(),
                header.payload
            ));
        }
        if checksum(&raw, &payload) != header.sha256 {
            return Err("its checksum does not match".into());
        }
        Ok(payload)
    }

    fn discard(&self, path: &Path, why: &str) {
        let _ = fs::remove_file(path);
        eprintln!(
            "moat model worker: prompt cache: removed {} ({why}); the prompt is read instead",
            path.display()
        );
    }
}

/// The flock of a model's folder, held while its files are read or
/// written; `None` when it cannot be had (the cache then goes on unlocked).
fn lock_folder(dir: &Path, how: FlockArg) -> Option<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .ok()?;
    Flock::lock(file, how).ok()
}

/// Make a file the most recently used (its modification time).
fn touch(path: &Path) {
    let _ = File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
}

/// Bytes the cache of every model holds, and those of one model's folder.
pub fn disk_usage(root: &Path) -> u64 {
    all_entries(root).iter().map(|f| f.2).sum()
}

/// Remove the saved prefixes of one model (by digest), or of all; returns
/// the bytes freed. A worker saving meanwhile finishes first (the flock).
pub fn remove(root: &Path, model: Option<&str>) -> io::Result<u64> {
    let dirs: Vec<PathBuf> = match model {
        Some(m) => vec![root.join(folder_name(m))],
        None => match fs::read_dir(root) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        },
    };
    let mut freed = 0;
    for dir in dirs {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        let lock = lock_folder(&dir, FlockArg::LockExclusive);
        for item in rd.flatten() {
            let path = item.path();
            if is_entry(&path) {
                let size = item.metadata().map_or(0, |m| m.len());
                match fs::remove_file(&path) {
                    Ok(()) => freed += size,
                    // Evicted by a worker meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        drop(lock);
    }
    Ok(freed)
}

/// (path, last used, size) of every saved prefix under `root`.
fn all_entries(root: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut out = Vec::new();
    let Ok(models) = fs::read_dir(root) else {
        return out;
    };
    for dir in models.flatten() {
        let Ok(files) = fs::read_dir(dir.path()) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            if !is_entry(&path) {
                continue;
            }
            if let Ok(m) = f.metadata() {
                out.push((
                    path,
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                ));
            }
        }
    }
    out
}

fn is_entry(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "kv")
}

/// A model digest (`sha256:…`) as a folder name.
fn folder_name(model: &str) -> String {
    model
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn file_name(model: &str, settings: &str, tokens: &[i32]) -> String {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0]);
    h.update(settings.as_bytes());
    h.update([0]);
    h.update(token_bytes(tokens));
    format!("{}.kv", &hex::encode(h.finalize())[..32])
}

fn token_bytes(tokens: &[i32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn checksum(tokens: &[u8], payload: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(tokens);
    h.update(payload);
    hex::encode(h.finalize())
}

fn read_header(f: &mut File) -> Result<Header, String> {
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic)
        .map_err(|_| "too short to be a cache file".to_string())?;
    if &magic != MAGIC {
        return Err("not a moat prompt cache file".into());
    }
    let mut len = [0u8; 4];
    f.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(format!("a header of {len} bytes"));
    }
    let mut json = vec![0u8; len as usize];
    f.read_exact(&mut json)
        .map_err(|e| format!("truncated header: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("a bad header: {e}"))
}

#[cfg(test)]
mod tests;

//! `models.json`, the index of the store in Docker Model Runner's format:
//! one entry per model (its manifest digest as id), with its tags and the
//! blobs it needs. Fields another tool wrote are kept on rewrite.

use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Index {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub models: Vec<IndexEntry>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct IndexEntry {
    /// `sha256:<hex>` of the manifest.
    pub id: String,
    /// Normalised references (`ai/smollm2:latest`).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: Vec<String>,
    /// Digests of the layers and the config.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub files: Vec<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// DMR is written in Go, which writes an empty list as `null`.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl Index {
    /// Takes `tag` off every entry (a tag names one model at most).
    pub fn untag(&mut self, tag: &str) {
        for entry in &mut self.models {
            entry.tags.retain(|t| t != tag);
        }
    }

    /// Adds `entry` unless a model of its id is there, and gives it `tag`.
    pub fn add(&mut self, entry: IndexEntry, tag: Option<&str>) {
        if let Some(tag) = tag {
            self.untag(tag);
        }
        let at = match self.models.iter().position(|m| m.id == entry.id) {
            Some(i) => i,
            None => {
                self.models.push(entry);
                self.models.len() - 1
            }
        };
        if let Some(tag) = tag {
            self.models[at].tags.push(tag.to_string());
        }
    }
}

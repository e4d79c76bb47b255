//! The documents of a model in Docker Model Runner's format: the config
//! blob (`application/vnd.docker.ai.model.config.v0.1+json`) with what the
//! GGUF header says in DMR's spelling, and the media types of its layers.
//! Field order and formats follow DMR's Go types, so that a model packaged
//! here reads the same in `docker model inspect`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::gguf::{GgufInfo, Value};

pub const MEDIA_MODEL_CONFIG: &str = "application/vnd.docker.ai.model.config.v0.1+json";
/// Config media types of every version start so (v0.2 holds directories).
pub const MEDIA_MODEL_CONFIG_PREFIX: &str = "application/vnd.docker.ai.model.config.";
pub const MEDIA_GGUF: &str = "application/vnd.docker.ai.gguf.v3";
pub const MEDIA_LICENSE: &str = "application/vnd.docker.ai.license";
pub const MEDIA_CHAT_TEMPLATE: &str = "application/vnd.docker.ai.chat.template.jinja";
/// The layer annotation that names the file a layer was made from.
pub const ANNOTATION_FILEPATH: &str = "org.cncf.model.filepath";

/// The inner `config` object: what `docker model ls` and `inspect` show.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub format: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub quantization: String,
    /// E.g. `134.52 M`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parameters: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub architecture: String,
    /// The weights' size, e.g. `93.81 MiB`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub size: String,
    /// Every header key of the (first) GGUF file, its value as text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gguf: BTreeMap<String, String>,
    /// The context size the model was packaged for, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_size: Option<u64>,
    /// Fields of newer DMR versions (safetensors, …), kept as they came.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ModelConfig {
    /// The context to run with: the packaged one, else the model's own
    /// (`<arch>.context_length`), as `docker model ls` shows it.
    pub fn context_length(&self) -> Option<u64> {
        self.context_size.or_else(|| {
            self.gguf
                .get(&format!("{}.context_length", self.architecture))
                .and_then(|v| v.parse().ok())
        })
    }
}

/// The whole config blob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ConfigFile {
    pub config: ModelConfig,
    #[serde(default)]
    pub descriptor: ConfigDescriptor,
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ConfigDescriptor {
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// The config of a GGUF model made of `shards` (in order), whose files
/// take `size` bytes together.
pub(crate) fn gguf_config(
    shards: &[GgufInfo],
    size: u64,
    context_size: Option<u64>,
) -> ModelConfig {
    let Some(first) = shards.first() else {
        return ModelConfig::default();
    };
    let parameters: u64 = shards.iter().map(|s| s.parameters).sum();
    let counted = GgufInfo {
        parameters,
        ..first.clone()
    };
    ModelConfig {
        format: "gguf".to_string(),
        quantization: first.quantization(),
        parameters: counted.parameters_label(),
        architecture: first.architecture().to_string(),
        size: human_size(size),
        gguf: metadata_strings(first),
        context_size,
        extra: serde_json::Map::new(),
    }
}

/// Header values as DMR writes them: integers in decimal, floats with six
/// decimals, arrays of at most ten elements joined with ", ", longer ones
/// left out.
fn metadata_strings(info: &GgufInfo) -> BTreeMap<String, String> {
    let scalar = |v: &Value| -> Option<String> {
        Some(match v {
            Value::Uint(n) => n.to_string(),
            Value::Int(n) => n.to_string(),
            Value::Float(f) => format!("{f:.6}"),
            Value::Bool(b) => b.to_string(),
            Value::String(s) => s.clone(),
            Value::Array { .. } | Value::LongString(_) => return None,
        })
    };
    info.metadata
        .iter()
        .filter_map(|(key, value)| {
            let text = match value {
                Value::Array { .. } => {
                    let elements = info.short_arrays.get(key)?;
                    elements
                        .iter()
                        .filter_map(scalar)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
                other => scalar(other)?,
            };
            Some((key.clone(), text))
        })
        .collect()
}

/// Sizes as DMR's config shows them: binary units, two decimals.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

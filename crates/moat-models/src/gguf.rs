//! A GGUF header reader, in safe Rust, that runs before llama.cpp ever sees
//! a file: a model from a registry or a user's disk is checked here (magic,
//! version, every length against the file's size, tensor data inside the
//! file) so that a truncated or corrupt file is refused with a reason
//! instead of crashing the engine.
//!
//! It keeps the metadata a store needs (architecture, name, quantization,
//! context length, chat template, parameter count) and skips the large
//! arrays (the tokenizer's vocabulary) without allocating for them.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
/// Strings llama.cpp would take are up to 1 GiB; a header value of ours is
/// kept only if it is at most this long (a chat template is a few KiB).
const MAX_KEPT_STRING: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;
/// Arrays up to this long are kept element by element (Docker Model
/// Runner's config shows them); longer ones, like the vocabulary, are not.
pub const SHORT_ARRAY: u64 = 10;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Why a file is not a usable GGUF model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("it is not a GGUF file (it does not start with \"GGUF\")")]
    NotGguf,
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    Version(u32),
    #[error("it is truncated or corrupt: {0}")]
    Corrupt(String),
    #[error("reading it failed: {0}")]
    Io(String),
}

/// One metadata value, as far as moat keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    String(String),
    /// Arrays are not kept; their element type and length are.
    Array {
        elem_type: u32,
        len: u64,
    },
    /// A string longer than moat keeps.
    LongString(u64),
}

/// What a GGUF header says.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufInfo {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// The elements of the arrays in `metadata` that have at most
    /// `SHORT_ARRAY` of them (and are not arrays of strings too long to keep).
    pub short_arrays: BTreeMap<String, Vec<Value>>,
    pub tensor_count: u64,
    /// Sum over tensors of their element counts.
    pub parameters: u64,
    /// Where tensor data starts; the file holds at least `data_end` bytes.
    pub data_start: u64,
    pub data_end: u64,
}

impl GgufInfo {
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn uint(&self, key: &str) -> Option<u64> {
        match self.metadata.get(key) {
            Some(Value::Uint(v)) => Some(*v),
            Some(Value::Int(v)) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }

    pub fn architecture(&self) -> &str {
        self.string("general.architecture").unwrap_or("")
    }

    /// The model's own context length (`<arch>.context_length`).
    pub fn context_length(&self) -> Option<u64> {
        self.uint(&format!("{}.context_length", self.architecture()))
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.string("tokenizer.chat_template")
    }

    /// The quantization name, as llama.cpp labels `general.file_type`.
    pub fn quantization(&self) -> String {
        let Some(ftype) = self.uint("general.file_type") else {
            return "unknown".into();
        };
        let name = match ftype & !1024 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            7 => "Q8_0",
            8 => "Q5_0",
            9 => "Q5_1",
            10 => "Q2_K",
            11 => "Q3_K_S",
            12 => "Q3_K_M",
            13 => "Q3_K_L",
            14 => "Q4_K_S",
            15 => "Q4_K_M",
            16 => "Q5_K_S",
            17 => "Q5_K_M",
            18 => "Q6_K",
            19 => "IQ2_XXS",
            20 => "IQ2_XS",
            21 => "Q2_K_S",
            22 => "IQ3_XS",
            23 => "IQ3_XXS",
            24 => "IQ1_S",
            25 => "IQ4_NL",
            26 => "IQ3_S",
            27 => "IQ3_M",
            28 => "IQ2_S",
            29 => "IQ2_M",
            30 => "IQ4_XS",
            31 => "IQ1_M",
            32 => "BF16",
            _ => return format!("ftype {ftype}"),
        };
        name.to_string()
    }

    /// Parameters the way Docker Model Runner shows them: `134.52 M`, `1.24 B`.
    pub fn parameters_label(&self) -> String {
        let p = self.parameters as f64;
        if p >= 1e9 {
            format!("{:.2} B", p / 1e9)
        } else {
            format!("{:.2} M", p / 1e6)
        }
    }
}

/// (elements per block, bytes per block) of the ggml tensor types whose
/// sizes are certain; tensors of other types are not size-checked.
fn block_size(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        30 => (1, 2),     // BF16
        _ => return None,
    })
}

struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn corrupt(&self, what: &str) -> GgufError {
        GgufError::Corrupt(format!("{what} at byte {}", self.pos))
    }

    /// Fails before reading past the end, so no length is trusted blindly.
    fn need(&self, n: u64, what: &str) -> Result<(), GgufError> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(GgufError::Corrupt(format!(
                "{what} at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.len
            )));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| GgufError::Io(e.to_string()))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), GgufError> {
        self.need(n, what)?;
        // A seek empties a BufReader's buffer: skipping each of a
        // tokenizer's 50k strings that way re-read 64 KiB per string, and
        // made every model load ~0.3 s slower. Short skips read through.
        if n <= 64 << 10 {
            let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())
                .map_err(|e| GgufError::Io(e.to_string()))?;
            if copied != n {
                return Err(self.corrupt(what));
            }
        } else {
            self.inner
                .seek(SeekFrom::Current(n as i64))
                .map_err(|e| GgufError::Io(e.to_string()))?;
        }
        self.pos += n;
        Ok(())
    }

    /// A string, kept if short enough; `None` (skipped) otherwise.
    fn string(&mut self, what: &str) -> Result<Result<String, u64>, GgufError> {
        let len = self.u64(what)?;
        if len > MAX_KEPT_STRING {
            self.skip(len, what)?;
            return Ok(Err(len));
        }
        self.need(len, what)?;
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| GgufError::Io(e.to_string()))?;
        self.pos += len;
        String::from_utf8(buf)
            .map(Ok)
            .map_err(|_| self.corrupt(&format!("{what} is not UTF-8")))
    }

    fn scalar_size(&self, t: u32) -> Option<u64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, t: u32, key: &str) -> Result<Value, GgufError> {
        let what = format!("the value of {key}");
        Ok(match t {
            0 => Value::Uint(u64::from(self.bytes::<1>(&what)?[0])),
            1 => Value::Int(i64::from(self.bytes::<1>(&what)?[0] as i8)),
            2 => Value::Uint(u64::from(u16::from_le_bytes(self.bytes(&what)?))),
            3 => Value::Int(i64::from(i16::from_le_bytes(self.bytes(&what)?))),
            4 => Value::Uint(u64::from(self.u32(&what)?)),
            5 => Value::Int(i64::from(i32::from_le_bytes(self.bytes(&what)?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.bytes(&what)?))),
            7 => Value::Bool(self.bytes::<1>(&what)?[0] != 0),
            8 => match self.string(&what)? {
                Ok(s) => Value::String(s),
                Err(len) => Value::LongString(len),
            },
            9 => self.array(key)?.0,
            10 => Value::Uint(self.u64(&what)?),
            11 => Value::Int(i64::from_le_bytes(self.bytes(&what)?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes(&what)?)),
            other => return Err(self.corrupt(&format!("{key} has unknown type {other}"))),
        })
    }

    /// An array: its summary, and its elements when it is short.
    fn array(&mut self, key: &str) -> Result<(Value, Option<Vec<Value>>), GgufError> {
        let what = format!("the value of {key}");
        let elem_type = self.u32(&what)?;
        let len = self.u64(&what)?;
        if elem_type == 9 {
            return Err(self.corrupt(&format!("{key} is an array of arrays")));
        }
        let summary = Value::Array { elem_type, len };
        if len <= SHORT_ARRAY {
            let mut elements = Vec::new();
            for _ in 0..len {
                elements.push(self.value(elem_type, key)?);
            }
            let kept = elements.iter().all(|v| !matches!(v, Value::LongString(_)));
            return Ok((summary, kept.then_some(elements)));
        }
        if elem_type == 8 {
            for _ in 0..len {
                let n = self.u64(&what)?;
                self.skip(n, &what)?;
            }
        } else {
            let size = self
                .scalar_size(elem_type)
                .ok_or_else(|| self.corrupt(&format!("{key} has element type {elem_type}")))?;
            let total = len
                .checked_mul(size)
                .ok_or_else(|| self.corrupt(&format!("{key} is too long")))?;
            self.skip(total, &what)?;
        }
        Ok((summary, None))
    }
}

/// Reads and checks the header of the GGUF file at `path`.
pub fn read_file(path: &Path) -> Result<GgufInfo, GgufError> {
    let file = std::fs::File::open(path).map_err(|e| GgufError::Io(e.to_string()))?;
    let len = file
        .metadata()
        .map_err(|e| GgufError::Io(e.to_string()))?
        .len();
    read(BufReader::with_capacity(1 << 16, file), len)
}

/// Reads and checks a GGUF header from `inner`, a file of `len` bytes.
pub fn read<R: Read + Seek>(inner: R, len: u64) -> Result<GgufInfo, GgufError> {
    let mut r = Reader { inner, pos: 0, len };
    if len < 4 || &r.bytes::<4>("the magic")? != MAGIC {
        return Err(GgufError::NotGguf);
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // Each entry takes at least 12 bytes (a key length and a type), each tensor 24.
    if kv_count > len / 12 || tensor_count > len / 24 {
        return Err(r.corrupt("the metadata or tensor count is larger than the file could hold"));
    }
    let mut metadata = BTreeMap::new();
    let mut short_arrays = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r
            .string("a metadata key")?
            .map_err(|_| r.corrupt("a metadata key is longer than 1 MiB"))?;
        let t = r.u32(&format!("the type of {key}"))?;
        let value = if t == 9 {
            let (summary, elements) = r.array(&key)?;
            if let Some(elements) = elements {
                short_arrays.insert(key.clone(), elements);
            }
            summary
        } else {
            r.value(t, &key)?
        };
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.corrupt(&format!("metadata key {key} appears twice")));
        }
    }
    let mut parameters: u64 = 0;
    let mut data_size: u64 = 0;
    for i in 0..tensor_count {
        r.string(&format!("the name of tensor {i}"))?
            .map_err(|_| r.corrupt("a tensor name is longer than 1 MiB"))?;
        let dims = r.u32("a tensor's dimension count")?;
        if dims > MAX_DIMS {
            return Err(r.corrupt(&format!("tensor {i} has {dims} dimensions")));
        }
        let mut elements: u64 = 1;
        for _ in 0..dims {
            let d = r.u64("a tensor dimension")?;
            elements = elements
                .checked_mul(d)
                .ok_or_else(|| r.corrupt(&format!("tensor {i} is too large")))?;
        }
        let ggml_type = r.u32("a tensor type")?;
        let offset = r.u64("a tensor offset")?;
        parameters = parameters.saturating_add(elements);
        if let Some((block, bytes)) = block_size(ggml_type) {
            if !elements.is_multiple_of(block) {
                return Err(r.corrupt(&format!("tensor {i} does not fill its blocks")));
            }
            let size = (elements / block)
                .checked_mul(bytes)
                .and_then(|s| s.checked_add(offset))
                .ok_or_else(|| r.corrupt(&format!("tensor {i} is too large")))?;
            data_size = data_size.max(size);
        } else {
            data_size = data_size.max(offset);
        }
    }
    let alignment = match metadata.get("general.alignment") {
        Some(Value::Uint(a)) if *a > 0 && a.is_power_of_two() => *a,
        Some(_) => return Err(r.corrupt("general.alignment is not a power of two")),
        None => DEFAULT_ALIGNMENT,
    };
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let data_end = data_start
        .checked_add(data_size)
        .ok_or_else(|| r.corrupt("the tensor data is too large"))?;
    if data_end > len {
        return Err(GgufError::Corrupt(format!(
            "its tensors need {data_end} bytes but the file has {len}; it is truncated"
        )));
    }
    Ok(GgufInfo {
        version,
        metadata,
        short_arrays,
        tensor_count,
        parameters,
        data_start,
        data_end,
    })
}

/// For the fuzz target: parse any bytes.
pub fn read_bytes(bytes: &[u8]) -> Result<GgufInfo, GgufError> {
    read(io::Cursor::new(bytes), bytes.len() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A small GGUF: two metadata entries, a vocabulary array, one Q4_0 tensor.
    pub(crate) fn sample() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&4u64.to_le_bytes()); // kvs
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "general.file_type");
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        s(&mut b, "llama.context_length");
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&8192u32.to_le_bytes());
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "bc");
        s(&mut b, "w");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&64u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes()); // Q4_0
        b.extend_from_slice(&0u64.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.extend(std::iter::repeat_n(0u8, 4 * 18)); // 128 elements = 4 blocks
        b
    }

    #[test]
    fn reads_what_the_store_needs() {
        let info = read_bytes(&sample()).unwrap();
        assert_eq!(
            (
                info.architecture(),
                info.quantization(),
                info.context_length(),
                info.parameters,
                info.tensor_count,
                info.metadata.get("tokenizer.ggml.tokens"),
            ),
            (
                "llama",
                "Q4_1".to_string(),
                Some(8192),
                128,
                1,
                Some(&Value::Array {
                    elem_type: 8,
                    len: 2
                })
            )
        );
    }

    #[test]
    fn refuses_truncated_and_foreign_files() {
        let good = sample();
        assert_eq!(read_bytes(b"PK\x03\x04zip"), Err(GgufError::NotGguf));
        let mut v9 = good.clone();
        v9[4] = 9;
        assert_eq!(read_bytes(&v9), Err(GgufError::Version(9)));
        // Every truncation is refused, none panics.
        for cut in 0..good.len() {
            assert!(read_bytes(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A length field pointing far past the end.
        let mut huge = good.clone();
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(read_bytes(&huge), Err(GgufError::Corrupt(_))));
    }
}

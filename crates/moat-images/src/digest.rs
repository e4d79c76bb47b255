//! Streaming digests of layer blobs: the sha256 of the stored bytes (the
//! blob digest) and of the uncompressed tar (the diff id), in one pass and
//! without ever holding a blob in memory.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

use crate::error::ImageError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const BUF: usize = 1 << 20;

/// How a layer blob is compressed, told by its first bytes (media types
/// from a registry are a claim; the bytes are the fact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Wraps `reader` in the decoder this compression needs.
    fn decoder<'a, R: Read + 'a>(self, reader: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(reader),
            Compression::Gzip => Box::new(MultiGzDecoder::new(reader)),
            Compression::Zstd => Box::new(
                ruzstd::decoding::StreamingDecoder::new(reader)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
            ),
        })
    }
}

/// `sha256:<hex>` of a byte slice (for the small JSON blobs).
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The compression of a file, from its magic bytes.
pub fn compression(path: &Path) -> Result<Compression, ImageError> {
    let mut file =
        File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let mut magic = [0u8; 4];
    let mut filled = 0;
    while filled < magic.len() {
        match file.read(&mut magic[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io(format!("read {}", path.display()), e)),
        }
    }
    Ok(if magic[..filled].starts_with(&GZIP_MAGIC) {
        Compression::Gzip
    } else if magic[..filled] == ZSTD_MAGIC {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// Opens a layer blob for reading its tar stream, decompressing gzip or zstd.
pub fn open_tar_stream(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let kind = compression(path)?;
    let file =
        File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    kind.decoder(BufReader::with_capacity(BUF, file))
        .map_err(|e| ImageError::BadLayer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// What one pass over a layer blob found.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDigests {
    /// sha256 of the bytes as stored.
    pub digest: String,
    /// Bytes as stored.
    pub size: u64,
    /// sha256 of the uncompressed tar, or why it could not be decompressed.
    pub diff_id: Result<String, String>,
    pub compression: Compression,
}

/// Hashes everything read through it and copies it to `sink`. A failed write
/// is kept aside so that it is not mistaken for a bad gzip stream.
struct Tee<'a, R> {
    inner: R,
    hasher: Sha256,
    size: u64,
    sink: Option<&'a mut File>,
    write_error: Option<io::Error>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        if let Some(sink) = self.sink.as_mut() {
            if let Err(e) = sink.write_all(&buf[..n]) {
                self.write_error = Some(e);
                return Err(io::Error::other("writing the copy failed"));
            }
        }
        Ok(n)
    }
}

/// Reads `path` once, hashing the stored bytes and (through a decoder for
/// gzip) the uncompressed tar, copying the stored bytes to `sink` if given.
pub fn digest_layer(path: &Path, sink: Option<&mut File>) -> Result<LayerDigests, ImageError> {
    let compression = compression(path)?;
    let file =
        File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let mut tee = Tee {
        inner: BufReader::with_capacity(BUF, file),
        hasher: Sha256::new(),
        size: 0,
        sink,
        write_error: None,
    };
    let read_err = |tee: &mut Tee<'_, BufReader<File>>, e: io::Error| match tee.write_error.take() {
        Some(w) => ImageError::io(format!("copy {}", path.display()), w),
        None => ImageError::io(format!("read {}", path.display()), e),
    };
    let compressed = compression != Compression::None;
    let diff_id = if compressed {
        let mut hasher = Sha256::new();
        let decoded = compression
            .decoder(&mut tee)
            .and_then(|mut decoder| copy_into_hasher(&mut decoder, &mut hasher));
        match decoded {
            Ok(()) => Ok(format!("sha256:{}", hex::encode(hasher.finalize()))),
            Err(e) => {
                if let Some(w) = tee.write_error.take() {
                    return Err(ImageError::io(format!("copy {}", path.display()), w));
                }
                Err(format!("{compression:?}: {e}"))
            }
        }
    } else {
        Err(String::new())
    };
    // Whatever the decoder left (trailing bytes, or all of a plain tar) is
    // still part of the blob.
    io::copy(&mut tee, &mut io::sink()).map_err(|e| read_err(&mut tee, e))?;
    let digest = format!("sha256:{}", hex::encode(tee.hasher.finalize()));
    let diff_id = if compressed {
        diff_id
    } else {
        Ok(digest.clone())
    };
    Ok(LayerDigests {
        digest,
        size: tee.size,
        diff_id,
        compression,
    })
}

fn copy_into_hasher(reader: &mut impl Read, hasher: &mut Sha256) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;

    #[test]
    fn digests_plain_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("p");
        std::fs::write(&plain, b"hello tar").unwrap();
        let gz = dir.path().join("g");
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"hello tar").unwrap();
        let gz_bytes = enc.finish().unwrap();
        std::fs::write(&gz, &gz_bytes).unwrap();

        let plain_digest = sha256_digest(b"hello tar");
        assert_eq!(
            digest_layer(&plain, None).unwrap(),
            LayerDigests {
                digest: plain_digest.clone(),
                size: 9,
                diff_id: Ok(plain_digest.clone()),
                compression: Compression::None
            }
        );
        let mut copy = File::create(dir.path().join("copy")).unwrap();
        assert_eq!(
            digest_layer(&gz, Some(&mut copy)).unwrap(),
            LayerDigests {
                digest: sha256_digest(&gz_bytes),
                size: gz_bytes.len() as u64,
                diff_id: Ok(plain_digest),
                compression: Compression::Gzip
            }
        );
        assert_eq!(std::fs::read(dir.path().join("copy")).unwrap(), gz_bytes);
    }

    #[test]
    fn broken_gzip_still_gives_the_blob_digest() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("b");
        let bytes = [0x1f, 0x8b, 0x08, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        std::fs::write(&bad, bytes).unwrap();
        let d = digest_layer(&bad, None).unwrap();
        assert_eq!(
            (d.digest, d.size, d.compression),
            (sha256_digest(&bytes), 13, Compression::Gzip)
        );
        assert!(d.diff_id.is_err());
    }
}

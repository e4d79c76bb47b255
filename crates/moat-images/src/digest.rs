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
const BUF: usize = 1 << 20;

/// `sha256:<hex>` of a byte slice (for the small JSON blobs).
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Whether the file starts with the gzip magic bytes.
pub fn is_gzip(path: &Path) -> Result<bool, ImageError> {
    let mut file =
        File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let mut magic = [0u8; 2];
    let mut filled = 0;
    while filled < magic.len() {
        match file.read(&mut magic[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io(format!("read {}", path.display()), e)),
        }
    }
    Ok(magic == GZIP_MAGIC)
}

/// Opens a layer blob for reading its tar stream, decompressing gzip.
pub fn open_tar_stream(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let gzip = is_gzip(path)?;
    let file =
        File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let reader = BufReader::with_capacity(BUF, file);
    Ok(if gzip {
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
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
    pub gzip: bool,
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
    let gzip = is_gzip(path)?;
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
    let diff_id = if gzip {
        let mut hasher = Sha256::new();
        let decoded = {
            let mut decoder = MultiGzDecoder::new(&mut tee);
            copy_into_hasher(&mut decoder, &mut hasher)
        };
        match decoded {
            Ok(()) => Ok(format!("sha256:{}", hex::encode(hasher.finalize()))),
            Err(e) => {
                if let Some(w) = tee.write_error.take() {
                    return Err(ImageError::io(format!("copy {}", path.display()), w));
                }
                Err(format!("gzip: {e}"))
            }
        }
    } else {
        Err(String::new())
    };
    // Whatever the decoder left (trailing bytes, or all of a plain tar) is
    // still part of the blob.
    io::copy(&mut tee, &mut io::sink()).map_err(|e| read_err(&mut tee, e))?;
    let digest = format!("sha256:{}", hex::encode(tee.hasher.finalize()));
    let diff_id = if gzip { diff_id } else { Ok(digest.clone()) };
    Ok(LayerDigests {
        digest,
        size: tee.size,
        diff_id,
        gzip,
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
                gzip: false
            }
        );
        let mut copy = File::create(dir.path().join("copy")).unwrap();
        assert_eq!(
            digest_layer(&gz, Some(&mut copy)).unwrap(),
            LayerDigests {
                digest: sha256_digest(&gz_bytes),
                size: gz_bytes.len() as u64,
                diff_id: Ok(plain_digest),
                gzip: true
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
            (d.digest, d.size, d.gzip),
            (sha256_digest(&bytes), 13, true)
        );
        assert!(d.diff_id.is_err());
    }
}

//! Sparse files in layers, both ways.
//!
//! A sandbox can make a file of terabytes that takes a few bytes of disk
//! (`truncate -s 3500M f`); archived byte by byte it would fill the disk of
//! whoever saves, pushes or pulls it. Such files are written as GNU sparse
//! entries (type `S`: the data map in the header, then only the data), found
//! with `SEEK_DATA`/`SEEK_HOLE`. Of the two sparse formats, this is the one
//! that moat's own unpacker (the `tar` crate) reads as well as GNU tar,
//! bsdtar, Go's archive/tar (containerd, skopeo) and Python; the `tar` crate
//! does not read PAX 1.0 sparse entries.
//!
//! Unpacking writes zeros back as holes (it seeks instead of writing), and
//! a layer may declare at most [`MAX_EXPANSION`] bytes of sparse files: the
//! holes cost nothing on disk but the unpacker still walks through them.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use tar::{GnuExtSparseHeader, Header};

/// Files with less hole than this are archived as plain files: a reader
/// that does not know sparse entries can still read them, at little cost.
pub(crate) const MIN_HOLES: u64 = 1 << 20;
/// What all the sparse files of one layer may add up to (apparent size).
pub(crate) const MAX_EXPANSION: u64 = 1 << 40;
/// Tar's block: every data chunk but the last must fill whole blocks.
const BLOCK: u64 = 512;
/// Map entries in the main GNU header; extension blocks hold 21 more each.
const IN_HEADER: usize = 4;

/// A run of data in a sparse file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub offset: u64,
    pub len: u64,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The data runs of `file`, which is `size` bytes long, or `None` when it
/// has too little hole to be worth a sparse entry or its file system cannot
/// tell. Runs are widened to 512-byte blocks (tar needs every run but the
/// last to be whole blocks; what that takes in reads as zeros) and merged.
pub(crate) fn data_map(file: &File, size: u64) -> io::Result<Option<Vec<Chunk>>> {
    let fd = file.as_raw_fd();
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match lseek(fd, to_off(pos)?, Whence::SeekData) {
            Ok(off) => off as u64,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match lseek(fd, to_off(start)?, Whence::SeekHole) {
            Ok(off) => (off as u64).min(size),
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            return Err(io::Error::other("its data moved while it was read"));
        }
        let chunk = Chunk {
            offset: start - start % BLOCK,
            len: 0,
        };
        let chunk_end = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(size);
        match chunks.last_mut() {
            Some(last) if chunk.offset <= last.end() => {
                last.len = chunk_end.max(last.end()) - last.offset
            }
            _ => chunks.push(Chunk {
                len: chunk_end - chunk.offset,
                ..chunk
            }),
        }
        pos = end;
    }
    let data: u64 = chunks.iter().map(|c| c.len).sum();
    if size - data < MIN_HOLES {
        return Ok(None);
    }
    Ok(Some(chunks))
}

fn to_off(n: u64) -> io::Result<i64> {
    i64::try_from(n).map_err(|_| io::Error::other("offset out of range"))
}

/// Makes `h` (a GNU header) a sparse entry of `real_size` bytes holding
/// `chunks`, and returns the extension blocks that must come right after
/// it, before the data.
pub(crate) fn make_sparse_header(
    h: &mut Header,
    chunks: &[Chunk],
    real_size: u64,
) -> io::Result<Vec<u8>> {
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(chunks.iter().map(|c| c.len).sum());
    // A last empty run at the end says how long the file is when it ends in
    // a hole; GNU tar writes it always, and so do we.
    let mut map = chunks.to_vec();
    map.push(Chunk {
        offset: real_size,
        len: 0,
    });
    let gnu = h
        .as_gnu_mut()
        .ok_or_else(|| io::Error::other("a sparse entry needs a GNU header"))?;
    gnu.set_real_size(real_size);
    for (slot, c) in gnu.sparse.iter_mut().zip(&map) {
        slot.set_offset(c.offset);
        slot.set_length(c.len);
    }
    gnu.set_is_extended(map.len() > IN_HEADER);
    let mut ext_bytes = Vec::new();
    let mut rest = map.iter().skip(IN_HEADER).peekable();
    while rest.peek().is_some() {
        let mut ext = GnuExtSparseHeader::new();
        for slot in ext.sparse.iter_mut() {
            match rest.next() {
                Some(c) => {
                    slot.set_offset(c.offset);
                    slot.set_length(c.len);
                }
                None => break,
            }
        }
        ext.set_is_extended(rest.peek().is_some());
        ext_bytes.extend_from_slice(ext.as_bytes());
    }
    Ok(ext_bytes)
}

/// Reads the data runs of a file one after the other, failing (rather than
/// writing a short entry that would break the archive) if the file shrank.
pub(crate) struct ChunkReader<'a> {
    file: &'a File,
    chunks: Vec<Chunk>,
    /// Index of the run being read, and how much of it is read.
    at: usize,
    done: u64,
}

impl<'a> ChunkReader<'a> {
    pub(crate) fn new(file: &'a File, chunks: Vec<Chunk>) -> Self {
        ChunkReader {
            file,
            chunks,
            at: 0,
            done: 0,
        }
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(c) = self.chunks.get(self.at) {
            let left = c.len - self.done;
            if left == 0 {
                self.at += 1;
                self.done = 0;
                continue;
            }
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = self.file.read_at(&mut buf[..want], c.offset + self.done)?;
            if n == 0 && want > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "it shrank while being saved; stop the sandbox and save again",
                ));
            }
            self.done += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

/// Whether a buffer is all zeros (memcmp against zeros is vectorised).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    buf.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn maps_data_runs_and_ignores_small_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        f.set_len(20 << 20).unwrap();
        let f = File::open(&path).unwrap();
        let map = data_map(&f, 20 << 20).unwrap().unwrap();
        // Block-aligned, covering the data, far less than the file.
        assert_eq!(map[0].offset, 0);
        assert!(map
            .iter()
            .all(|c| c.offset % BLOCK == 0 && c.len % BLOCK == 0));
        assert!(map
            .iter()
            .any(|c| c.offset <= 8 << 20 && c.end() >= (8 << 20) + 6));
        assert!(map.iter().map(|c| c.len).sum::<u64>() < 1 << 20);
        let mut data = Vec::new();
        ChunkReader::new(&f, map.clone())
            .read_to_end(&mut data)
            .unwrap();
        assert_eq!(data.len() as u64, map.iter().map(|c| c.len).sum::<u64>());

        let dense = tmp.path().join("dense");
        std::fs::write(&dense, vec![1u8; 100_000]).unwrap();
        let d = File::open(&dense).unwrap();
        assert_eq!(data_map(&d, 100_000).unwrap(), None);
    }

    #[test]
    fn zero_test() {
        assert!(is_zero(&[0u8; 10_000]));
        let mut b = vec![0u8; 10_000];
        b[9_999] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }
}

//! Turns on the cores, shared by every worker of one runner. llama.cpp runs
//! a decode on a thread per core, and its OpenMP threads spin at each of the
//! graph's barriers; two workers decoding at once each hold a core the
//! other's barrier waits for, and both crawl (measured on 2 cores: SmolLM2
//! and Gemma 3 at 6.5 and 6.2 tokens/s together, against 75 and 42 alone).
//! So a worker takes an exclusive lock on one file, which every worker of
//! the runner opens itself, for the length of each decode: two busy models
//! take turns at full speed instead.

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// One worker's handle on the runner's lock file.
pub struct Cores {
    /// `None` when there is no lock file (one worker alone, a test).
    file: Option<File>,
}

impl Cores {
    /// Opens `path` (creating it); without one, turns are not taken.
    pub fn open(path: Option<&Path>) -> Cores {
        let file = path.and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(p)
                .map_err(|e| {
                    eprintln!("moat: could not open {} ({e}); decoding without taking turns with other models", p.display());
                })
                .ok()
        });
        Cores { file }
    }

    /// Runs `work` while holding the cores.
    pub fn turn<R>(&mut self, work: impl FnOnce() -> R) -> R {
        let Some(file) = self.file.take() else {
            return work();
        };
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(held) => {
                let result = work();
                // Unlocking only fails for a descriptor that is not open.
                self.file = held.unlock().ok();
                result
            }
            Err((file, _)) => {
                self.file = Some(file);
                work()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    #[test]
    fn two_holders_take_turns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cores.lock");
        let start = Arc::new(Barrier::new(2));
        let spans: Vec<_> = (0..2)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    let mut cores = Cores::open(Some(&path));
                    start.wait();
                    cores.turn(|| {
                        let t = Instant::now();
                        std::thread::sleep(Duration::from_millis(100));
                        (t, Instant::now())
                    })
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect();
        let (a, b) = (spans[0], spans[1]);
        assert!(a.1 <= b.0 || b.1 <= a.0, "the turns overlapped: {spans:?}");
    }
}

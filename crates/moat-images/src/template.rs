//! Template builds: a recipe (kept as data, so its digest keys the cache)
//! turned into a root file system tarball by mmdebstrap.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::error::ImageError;
use crate::fsutil::{fsync_dir, remove_tree, sweep_stale_tmp, tmp_name};

/// How to build one template's root file system.
#[derive(Debug, PartialEq, Eq)]
pub struct Recipe {
    pub name: &'static str,
    /// Debian suite, e.g. `bookworm`.
    pub suite: &'static str,
    pub mirror: &'static str,
    pub packages: &'static [&'static str],
    /// Shell commands run inside the new root, in order.
    pub customize: &'static [&'static str],
}

static SHELL: Recipe = Recipe {
    name: "shell",
    suite: "bookworm",
    mirror: "http://deb.debian.org/debian",
    packages: &[
        "bash",
        "coreutils",
        "sudo",
        "git",
        "curl",
        "ca-certificates",
        "python3",
        "python3-requests",
        // Node.js's official binary (which agents bring) needs it.
        "libatomic1",
        "procps",
        "less",
        "jq",
        "passwd",
    ],
    customize: &[
        "groupadd -g 1000 agent",
        "useradd -m -u 1000 -g 1000 -s /bin/bash agent",
        "echo 'agent ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/agent",
        "chmod 0440 /etc/sudoers.d/agent",
    ],
};

static RECIPES: [&Recipe; 1] = [&SHELL];

/// Free space a build needs before it starts: a Debian root with these
/// packages is a few hundred MiB, and mmdebstrap stages it twice.
pub const MIN_FREE: u64 = 1 << 30;

/// The recipe of that name (only `shell` for now).
pub fn recipe(name: &str) -> Option<&'static Recipe> {
    RECIPES.iter().copied().find(|r| r.name == name)
}

/// Names of all recipes.
pub fn names() -> Vec<&'static str> {
    RECIPES.iter().map(|r| r.name).collect()
}

impl Recipe {
    /// sha256 (hex) of every field, length-prefixed so that no two recipes
    /// encode alike; any change to the recipe makes a new cache entry.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |label: &str, value: &str| {
            h.update((label.len() as u64).to_le_bytes());
            h.update(label.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value.as_bytes());
        };
        field("moat-template", "1");
        field("name", self.name);
        field("suite", self.suite);
        field("mirror", self.mirror);
        field("packages", &self.packages.len().to_string());
        for p in self.packages {
            field("package", p);
        }
        field("customize", &self.customize.len().to_string());
        for c in self.customize {
            field("step", c);
        }
        hex::encode(h.finalize())
    }

    /// The cached tarball's file name: `<name>-<digest[..12]>.tar`.
    pub fn tarball_name(&self) -> String {
        format!("{}-{}.tar", self.name, &self.digest()[..12])
    }
}

/// Builds (or finds in the cache) the root file system tarball of `recipe`
/// at `cache_dir/templates/<name>-<digest[..12]>.tar`. `progress` gets each
/// line mmdebstrap prints on stderr.
pub fn build_rootfs(
    recipe: &Recipe,
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let dir = cache_dir.join("templates");
    let target = dir.join(recipe.tarball_name());
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| ImageError::io(format!("create {}", dir.display()), e))?;
    sweep_stale_tmp(&dir, SystemTime::now());
    check_space(&dir, free_space(&dir)?, MIN_FREE)?;
    let tool = find_in_path("mmdebstrap").ok_or_else(missing_mmdebstrap)?;

    // Ends in .tar as well, in case mmdebstrap looks at the name.
    let stem = recipe.tarball_name();
    let tmp = dir.join(tmp_name(stem.trim_end_matches(".tar"), ".tar"));
    let result = run_mmdebstrap(recipe, &tool, &tmp, cache_dir, progress);
    if let Err(e) = result {
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    let finish = std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &target));
    if let Err(e) = finish {
        let _ = remove_tree(&tmp);
        return Err(ImageError::io(format!("write {}", target.display()), e));
    }
    fsync_dir(&dir)?;
    Ok(target)
}

fn run_mmdebstrap(
    recipe: &Recipe,
    tool: &Path,
    tmp: &Path,
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let args = mmdebstrap_args(recipe, tmp, nix::unistd::geteuid().is_root());
    tracing::info!("running {} {}", tool.display(), args.join(" "));
    let mut child = Command::new(tool)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => missing_mmdebstrap(),
            _ => ImageError::io(format!("start {}", tool.display()), e),
        })?;
    let mut tail = Tail::default();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end();
            progress(line);
            tail.push(line);
        }
    }
    let status = child
        .wait()
        .map_err(|e| ImageError::io(format!("wait for {}", tool.display()), e))?;
    if status.success() {
        return Ok(());
    }
    let have = free_space(cache_dir).unwrap_or(0);
    Err(build_failure(
        recipe,
        cache_dir,
        &tail,
        &status.to_string(),
        have,
    ))
}

/// The last lines of stderr, and whether any said the disk was full.
#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    no_space: bool,
}

const TAIL_LINES: usize = 5;

impl Tail {
    fn push(&mut self, line: &str) {
        if line.contains("No space left on device") {
            self.no_space = true;
        }
        if line.trim().is_empty() {
            return;
        }
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_string());
    }
}

fn build_failure(
    recipe: &Recipe,
    cache_dir: &Path,
    tail: &Tail,
    status: &str,
    have: u64,
) -> ImageError {
    if tail.no_space {
        return ImageError::NoSpace {
            path: cache_dir.to_path_buf(),
            need: MIN_FREE,
            have,
        };
    }
    let mut text: Vec<&str> = tail.lines.iter().map(String::as_str).collect();
    text.push(status);
    ImageError::TemplateBuild {
        name: recipe.name.to_string(),
        tail: format!("mmdebstrap said: {}", text.join(" | ")),
    }
}

/// The mmdebstrap command line (without the program).
pub(crate) fn mmdebstrap_args(recipe: &Recipe, out: &Path, as_root: bool) -> Vec<String> {
    let mode = if as_root { "root" } else { "unshare" };
    let mut args = vec![
        "--variant=apt".to_string(),
        format!("--mode={mode}"),
        "--format=tar".to_string(),
        format!("--include={}", recipe.packages.join(",")),
        "--skip=output/dev".to_string(),
    ];
    for step in recipe.customize {
        args.push(format!(
            "--customize-hook=chroot \"$1\" sh -c {}",
            shell_quote(step)
        ));
    }
    args.push(recipe.suite.to_string());
    args.push(out.display().to_string());
    args.push(recipe.mirror.to_string());
    args
}

/// Single-quotes a string for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Refuses to start when the file system holding `path` has less than `need` free.
pub(crate) fn check_space(path: &Path, have: u64, need: u64) -> Result<(), ImageError> {
    if have < need {
        return Err(ImageError::NoSpace {
            path: path.to_path_buf(),
            need,
            have,
        });
    }
    Ok(())
}

fn free_space(path: &Path) -> Result<u64, ImageError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| ImageError::io(format!("check free space on {}", path.display()), e.into()))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

fn missing_mmdebstrap() -> ImageError {
    ImageError::MissingTool {
        tool: "mmdebstrap".to_string(),
        install: "apt-get install mmdebstrap".to_string(),
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TEST_RECIPE: Recipe = Recipe {
        name: "t",
        suite: "bookworm",
        mirror: "http://m",
        packages: &["a", "b"],
        customize: &["echo 'x'"],
    };

    #[test]
    fn knows_the_shell_recipe() {
        assert_eq!(names(), vec!["shell"]);
        let shell = recipe("shell").unwrap();
        assert_eq!(
            (shell.suite, shell.mirror, shell.packages.len()),
            ("bookworm", "http://deb.debian.org/debian", 13)
        );
        assert_eq!(recipe("nope"), None);
    }

    #[test]
    fn digest_is_stable_and_covers_every_field() {
        // Pinned: a change here silently invalidates every user's cache.
        assert_eq!(
            TEST_RECIPE.digest(),
            "f0b97d1ac6840be02d34cf75af1214d7d21cea6722c2200d3977234f70464cbc"
        );
        let shell = recipe("shell").unwrap();
        assert_eq!(shell.digest(), shell.digest());
        assert_eq!(shell.digest().len(), 64);
        let variants = [
            Recipe {
                name: "u",
                ..TEST_RECIPE
            },
            Recipe {
                suite: "trixie",
                ..TEST_RECIPE
            },
            Recipe {
                mirror: "http://n",
                ..TEST_RECIPE
            },
            Recipe {
                packages: &["a,b"],
                ..TEST_RECIPE
            },
            Recipe {
                packages: &["a"],
                customize: &["b", "echo 'x'"],
                ..TEST_RECIPE
            },
            Recipe {
                customize: &[],
                ..TEST_RECIPE
            },
        ];
        let mut all: Vec<String> = variants.iter().map(Recipe::digest).collect();
        all.push(TEST_RECIPE.digest());
        all.sort();
        all.dedup();
        assert_eq!(all.len(), variants.len() + 1);
        assert_eq!(
            TEST_RECIPE.tarball_name(),
            format!("t-{}.tar", &TEST_RECIPE.digest()[..12])
        );
    }

    #[test]
    fn builds_the_command_line() {
        assert_eq!(
            mmdebstrap_args(&TEST_RECIPE, Path::new("/c/t.tmp-1.tar"), false),
            vec![
                "--variant=apt",
                "--mode=unshare",
                "--format=tar",
                "--include=a,b",
                "--skip=output/dev",
                r#"--customize-hook=chroot "$1" sh -c 'echo '\''x'\'''"#,
                "bookworm",
                "/c/t.tmp-1.tar",
                "http://m",
            ]
        );
        assert_eq!(
            mmdebstrap_args(&TEST_RECIPE, Path::new("/o"), true)[1],
            "--mode=root"
        );
    }

    #[test]
    fn checks_free_space() {
        assert!(check_space(Path::new("/c"), MIN_FREE, MIN_FREE).is_ok());
        match check_space(Path::new("/c"), MIN_FREE - 1, MIN_FREE) {
            Err(ImageError::NoSpace { path, need, have }) => {
                assert_eq!(
                    (path, need, have),
                    (PathBuf::from("/c"), MIN_FREE, MIN_FREE - 1)
                )
            }
            other => panic!("expected NoSpace, got {other:?}"),
        }
    }

    #[test]
    fn maps_failures() {
        let mut tail = Tail::default();
        for line in [
            "I: one", "", "I: two", "I: three", "I: four", "I: five", "E: six",
        ] {
            tail.push(line);
        }
        match build_failure(&TEST_RECIPE, Path::new("/c"), &tail, "exit status: 1", 7) {
            ImageError::TemplateBuild { name, tail } => assert_eq!(
                (name.as_str(), tail.as_str()),
                ("t", "mmdebstrap said: I: two | I: three | I: four | I: five | E: six | exit status: 1")
            ),
            other => panic!("expected TemplateBuild, got {other:?}"),
        }
        tail.push("tar: write error: No space left on device");
        match build_failure(&TEST_RECIPE, Path::new("/c"), &tail, "exit status: 1", 7) {
            ImageError::NoSpace { path, need, have } => {
                assert_eq!((path, need, have), (PathBuf::from("/c"), MIN_FREE, 7))
            }
            other => panic!("expected NoSpace, got {other:?}"),
        }
    }

    #[test]
    fn cached_tarball_is_returned_without_building() {
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("templates");
        std::fs::create_dir_all(&dir).unwrap();
        let cached = dir.join(TEST_RECIPE.tarball_name());
        std::fs::write(&cached, b"tar").unwrap();
        let mut lines = Vec::new();
        let got = build_rootfs(&TEST_RECIPE, cache.path(), &mut |l| {
            lines.push(l.to_string())
        })
        .unwrap();
        assert_eq!((got, lines), (cached, Vec::<String>::new()));
    }
}

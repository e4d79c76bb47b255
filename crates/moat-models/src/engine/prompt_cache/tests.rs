use std::fs;
use std::time::{Duration, SystemTime};

use super::*;

fn spec(root: &Path, max_bytes: u64) -> PromptCacheSpec {
    PromptCacheSpec {
        root: root.to_path_buf(),
        max_bytes,
        model: "sha256:abc".into(),
    }
}

fn tokens(n: i32, salt: i32) -> Vec<i32> {
    (0..n).map(|i| i * 7 + salt).collect()
}

fn only_file(cache: &PromptCache) -> PathBuf {
    assert_eq!(cache.entries().len(), 1);
    cache.entries()[0].path.clone()
}

#[test]
fn a_saved_prefix_is_found_by_a_later_worker_and_restored_whole() {
    let root = tempfile::tempdir().unwrap();
    let mut first = PromptCache::open(&spec(root.path(), 1 << 30), "ctx=4096");
    let saved = tokens(100, 1);
    first.save(&saved, b"the state bytes").unwrap();

    let mut later = PromptCache::open(&spec(root.path(), 1 << 30), "ctx=4096");
    assert_eq!(
        later.entries(),
        &[Entry {
            path: only_file(&first),
            tokens: saved.clone()
        }]
    );
    let mut prompt = saved[..80].to_vec();
    prompt.extend([-1, -2, -3]);
    assert_eq!(later.best(&prompt), Some((0, 80)));
    assert_eq!(later.payload(0).as_deref(), Some(&b"the state bytes"[..]));
    // Too short a shared prefix is not worth a restore.
    assert_eq!(later.best(&saved[..MIN_TOKENS - 1]), None);
}

#[test]
fn saving_the_same_prefix_twice_keeps_one_file() {
    let root = tempfile::tempdir().unwrap();
    let mut cache = PromptCache::open(&spec(root.path(), 1 << 30), "s");
    cache.save(&tokens(70, 0), b"x").unwrap();
    cache.save(&tokens(70, 0), b"x").unwrap();
    assert_eq!(cache.entries().len(), 1);
    assert_eq!(all_entries(root.path()).len(), 1);
}

#[test]
fn another_context_setting_neither_uses_nor_removes_a_file() {
    let root = tempfile::tempdir().unwrap();
    let mut a = PromptCache::open(&spec(root.path(), 1 << 30), "ctx=4096");
    a.save(&tokens(70, 0), b"x").unwrap();
    let b = PromptCache::open(&spec(root.path(), 1 << 30), "ctx=8192");
    assert!(b.entries().is_empty());
    assert!(only_file(&a).exists());
}

/// Every kind of damage: the file is removed at indexing or at restore,
/// and nothing of it is returned.
#[test]
fn a_damaged_or_foreign_file_is_removed_and_never_returned() {
    type Damage = fn(&Path);
    let cases: Vec<(&str, Damage, bool)> = vec![
        (
            "truncated",
            |p| {
                let len = fs::metadata(p).unwrap().len();
                File::options()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(len - 3)
                    .unwrap();
            },
            true,
        ),
        (
            "a flipped payload byte",
            |p| {
                let mut b = fs::read(p).unwrap();
                let last = b.len() - 1;
                b[last] ^= 0xff;
                fs::write(p, b).unwrap();
            },
            false,
        ),
        (
            "another build",
            |p| rewrite_header(p, |h| h.build = "llama-cpp-sys-2 0.0.1".into()),
            true,
        ),
        (
            "another model",
            |p| rewrite_header(p, |h| h.model = "sha256:other".into()),
            true,
        ),
        (
            "not ours",
            |p| fs::write(p, b"GGUF and more").unwrap(),
            true,
        ),
        ("empty", |p| fs::write(p, b"").unwrap(), true),
    ];
    for (what, damage, at_index) in cases {
        let root = tempfile::tempdir().unwrap();
        let mut cache = PromptCache::open(&spec(root.path(), 1 << 30), "s");
        cache.save(&tokens(70, 0), b"the state bytes").unwrap();
        let path = only_file(&cache);
        damage(&path);
        let mut later = PromptCache::open(&spec(root.path(), 1 << 30), "s");
        if at_index {
            assert!(later.entries().is_empty(), "{what}: indexed");
        } else {
            assert_eq!(later.payload(0), None, "{what}: restored");
            assert!(later.entries().is_empty(), "{what}: still indexed");
        }
        assert!(!path.exists(), "{what}: the file stays");
    }
}

fn rewrite_header(path: &Path, change: fn(&mut Header)) {
    let mut f = File::open(path).unwrap();
    let mut header = read_header(&mut f).unwrap();
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    change(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = MAGIC.to_vec();
    out.extend((json.len() as u32).to_le_bytes());
    out.extend(json);
    out.extend(rest);
    fs::write(path, out).unwrap();
}

#[test]
fn the_bound_evicts_the_least_recently_used_prefix_of_any_model() {
    let root = tempfile::tempdir().unwrap();
    let payload = vec![7u8; 1000];
    let mut cache = PromptCache::open(&spec(root.path(), 1 << 30), "s");
    cache.save(&tokens(70, 1), &payload).unwrap();
    cache.save(&tokens(70, 2), &payload).unwrap();
    let mut other = PromptCache::open(
        &PromptCacheSpec {
            model: "sha256:def".into(),
            ..spec(root.path(), 1 << 30)
        },
        "s",
    );
    other.save(&tokens(70, 3), &payload).unwrap();
    let paths = [
        cache.entries()[0].path.clone(),
        cache.entries()[1].path.clone(),
        other.entries()[0].path.clone(),
    ];
    // Oldest first: the first prefix, then the other model's, then the
    // second; then the first is restored, which makes it the newest.
    let base = SystemTime::now() - Duration::from_secs(100);
    for (i, p) in [&paths[0], &paths[2], &paths[1]].into_iter().enumerate() {
        let f = File::options().write(true).open(p).unwrap();
        f.set_modified(base + Duration::from_secs(i as u64))
            .unwrap();
    }
    assert!(cache.payload(0).is_some());
    let one = fs::metadata(&paths[0]).unwrap().len();
    cache.max_bytes = 2 * one;
    assert_eq!(cache.evict(), 2 * one);
    assert!(paths[0].exists() && paths[1].exists());
    assert!(!paths[2].exists(), "the least recently used file stays");
    assert_eq!(disk_usage(root.path()), 2 * one);
}

#[test]
fn remove_clears_one_model_or_all() {
    let root = tempfile::tempdir().unwrap();
    let mut a = PromptCache::open(&spec(root.path(), 1 << 30), "s");
    a.save(&tokens(70, 1), b"x").unwrap();
    let mut b = PromptCache::open(
        &PromptCacheSpec {
            model: "sha256:def".into(),
            ..spec(root.path(), 1 << 30)
        },
        "s",
    );
    b.save(&tokens(70, 1), b"y").unwrap();
    let one = disk_usage(root.path()) / 2;
    assert_eq!(remove(root.path(), Some("sha256:def")).unwrap(), one);
    assert!(only_file(&a).exists());
    assert_eq!(remove(root.path(), None).unwrap(), one);
    assert_eq!(disk_usage(root.path()), 0);
    assert_eq!(remove(&root.path().join("none"), None).unwrap(), 0);
}

#[test]
fn a_full_disk_fails_the_write() {
    let root = tempfile::tempdir().unwrap();
    let cache = PromptCache::open(&spec(root.path(), 1 << 30), "s");
    let mut full = File::options().write(true).open("/dev/full").unwrap();
    let err = cache
        .write_entry(&mut full, &tokens(70, 0), &[0u8; 1 << 16])
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
}

#[test]
fn a_failed_save_leaves_no_file_and_no_entry() {
    let root = tempfile::tempdir().unwrap();
    let mut cache = PromptCache::open(&spec(root.path(), 1 << 30), "s");
    // The temporary file cannot be made: a folder holds its name.
    fs::create_dir_all(
        cache
            .dir
            .join(format!(".tmp-{}", std::process::id()))
            .join("x"),
    )
    .unwrap();
    let err = cache.save(&tokens(70, 0), b"x").unwrap_err();
    assert!(
        err.starts_with("the prompt cache could not save 70 tokens"),
        "{err}"
    );
    assert!(cache.entries().is_empty());
    assert_eq!(all_entries(root.path()), vec![]);
}

#[test]
fn llama_cpp_build_matches_the_lock_file() {
    let lock = include_str!("../../../../../Cargo.lock");
    let at = lock
        .find("name = \"llama-cpp-sys-2\"\nversion = \"")
        .expect("llama-cpp-sys-2 in Cargo.lock");
    let rest = &lock[at + "name = \"llama-cpp-sys-2\"\nversion = \"".len()..];
    let version = &rest[..rest.find('"').unwrap()];
    assert_eq!(LLAMA_CPP_BUILD, format!("llama-cpp-sys-2 {version}"));
}

#[test]
fn a_prefix_larger_than_the_bound_is_not_saved() {
    let root = tempfile::tempdir().unwrap();
    let mut cache = PromptCache::open(&spec(root.path(), 100), "s");
    assert_eq!(cache.save(&tokens(70, 0), &[0u8; 101]), Ok(false));
    assert_eq!(cache.save(&tokens(70, 0), &[0u8; 100]), Ok(true));
    assert_eq!(cache.entries().len(), 1);
}

/// Workers of one model ending together (each its own open of the lock
/// file, as separate processes have): one whole file, readable.
#[test]
fn writers_of_one_prefix_at_once_leave_one_whole_file() {
    let root = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let mut cache = PromptCache::open(&spec(root.path(), 1 << 30), "s");
                assert_eq!(cache.save(&tokens(70, 0), &payload), Ok(true));
            });
        }
    });
    let mut later = PromptCache::open(&spec(root.path(), 1 << 30), "s");
    assert_eq!(later.entries().len(), 1);
    assert_eq!(later.payload(0), Some(payload));
    let names: Vec<String> = fs::read_dir(&later.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

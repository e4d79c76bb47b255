//! End-to-end: disk budgets, and the default limits every sandbox gets.
//!
//! A sandbox that writes past its budget gets ENOSPC inside and keeps
//! running, and the host's free space is untouched; the budget survives a
//! stop, a reboot (its mount undone behind the daemon's back) and a daemon
//! restart; `rm` leaves no mount, loop device or image behind. An image of
//! the default budget is made ahead: a sandbox given one is held to its
//! budget all the same, two creates at once get two, and a daemon that is
//! killed leaves none of them mounted (the next one makes its own). Rootless,
//! the budget cannot be enforced, and `create` and `inspect` say so.
//!
//! The tests here take one lock for their whole run: they measure the
//! host's free space, which a sibling importing a template would disturb.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::rootless::Rootless;
use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// Held for a whole test: the tests of this file run one at a time.
fn serial() -> std::fs::File {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let lock = std::fs::File::create(base.join("disk-tests.lock")).unwrap();
    lock.lock().unwrap();
    lock
}

fn sync() {
    assert!(Command::new("sync").status().unwrap().success());
}

/// Bytes free on the file system of the state root.
fn free_bytes() -> u64 {
    let st = nix::sys::statvfs::statvfs(&roots().0).unwrap();
    st.blocks_available() as u64 * st.fragment_size() as u64
}

fn state_dir(id: &str) -> PathBuf {
    std::fs::canonicalize(roots().0.join("sandboxes"))
        .unwrap()
        .join(id)
}

/// The line of /proc/self/mountinfo whose mount point is `dir`, if any.
fn mount_of(dir: &Path) -> Option<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(dir.as_str()))
        .map(String::from)
}

/// `losetup -a`'s lines that name `image`.
fn loop_devices_of(image: &Path) -> Vec<String> {
    losetup_lines(&image.display().to_string())
}

/// `losetup -a`'s lines that contain `what`.
fn losetup_lines(what: &str) -> Vec<String> {
    let out = Command::new("losetup").arg("-a").output().unwrap();
    text(&out.stdout)
        .lines()
        .filter(|l| l.contains(what))
        .map(String::from)
        .collect()
}

/// Wait (up to 10 s) until `f` holds; the loop device of a removed sandbox
/// goes once the kernel has let go of its last mount.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// The blocks the image of `state_dir` takes on the host, in bytes. The image
/// lies beneath its own mount: a plain bind of the parent shows it.
fn image_allocated(state_dir: &Path) -> u64 {
    let peek = tempfile::tempdir_in("/tmp").unwrap();
    let parent = state_dir.parent().unwrap();
    let ok = Command::new("mount")
        .args([
            "--bind",
            parent.to_str().unwrap(),
            peek.path().to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(
        ok.success(),
        "bind-mounting {} needs root",
        parent.display()
    );
    let image = peek
        .path()
        .join(state_dir.file_name().unwrap())
        .join("disk.img");
    let meta = std::fs::metadata(&image);
    let _ = Command::new("umount").arg(peek.path()).status();
    let meta = meta.unwrap_or_else(|e| panic!("no image at {}: {e}", image.display()));
    meta.blocks() * 512
}

/// `dd` of `mib` MiB of zeros into `path` inside, as the agent.
fn fill(sb: &Sandbox, path: &str, mib: u64) -> Output {
    sb.sh(&format!(
        "dd if=/dev/zero of={path} bs=1M count={mib} conv=fsync"
    ))
}

fn assert_enospc(out: &Output, what: &str) {
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("No space left on device"),
        "{what}: exit {:?}, stderr {err}",
        out.status.code()
    );
}

#[test]
fn a_sandbox_that_fills_its_budget_gets_enospc_and_the_host_keeps_its_space() {
    let _serial = serial();
    let sb = Sandbox::with_args("disk", &["--disk", "64m"]);
    let info = sb.inspect();
    assert_eq!(
        info["limits"]["disk"],
        json!({"bytes": 64 * MIB, "enforced": true, "by": "ext4 image on a loop device"})
    );
    let dir = state_dir(info["id"].as_str().unwrap());
    let image = dir.join("disk.img");
    let mount = mount_of(&dir).expect("the state directory is a mount");
    assert!(
        mount.contains(" - ext4 /dev/loop") && mount.contains("nosuid") && mount.contains("nodev"),
        "{mount}"
    );

    sync();
    let before = free_bytes();
    // The root file system: the overlay's upper layer, on the image.
    assert_enospc(&fill(&sb, "/tmp/x", 200), "200 MiB into /tmp");
    // The in-memory one: a quarter of the budget.
    let out = sb.sh("df -k --output=size /dev/shm | tail -1");
    assert_eq!(text(&out.stdout).trim(), "16384", "{}", text(&out.stderr));
    assert_enospc(&fill(&sb, "/dev/shm/x", 200), "200 MiB into /dev/shm");
    // What the sandbox wrote reaches the image, and the image the host's disk.
    sync();
    let after = free_bytes();
    assert!(
        before.saturating_sub(after) <= 64 * MIB,
        "the host lost {} MiB to a sandbox with a 64 MiB budget",
        before.saturating_sub(after) / MIB
    );
    let allocated = image_allocated(&dir);
    assert!(
        allocated <= 64 * MIB,
        "the image takes {} MiB of the host",
        allocated / MIB
    );

    // The sandbox still runs, and has its space back once the file goes.
    let out = sb.sh("rm /tmp/x /dev/shm/x && echo alive && dd if=/dev/zero of=/tmp/y bs=1M count=8 2>/dev/null && echo wrote");
    assert_eq!(text(&out.stdout), "alive\nwrote\n", "{}", text(&out.stderr));

    // rm: no mount, no loop device, no image, no state directory.
    moat_ok(&["sandbox", "rm", &sb.name]);
    assert_eq!(mount_of(&dir), None);
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        eventually(|| loop_devices_of(&image).is_empty()),
        "loop devices left: {:?}",
        loop_devices_of(&image)
    );
}

#[test]
fn a_stopped_sandbox_starts_again_with_its_budget_after_a_reboot() {
    let _serial = serial();
    let sb = Sandbox::with_args("disk-stop", &["--disk", "64m"]);
    let dir = state_dir(sb.inspect()["id"].as_str().unwrap());
    assert!(sb.root_sh("echo kept > /etc/marker").status.success());
    moat_ok(&["sandbox", "stop", &sb.name]);
    // Stopped, it keeps its files, on its mounted image.
    assert!(
        mount_of(&dir).is_some(),
        "a stopped sandbox keeps its mount"
    );
    assert!(dir.join("upper/etc/marker").exists());

    // A reboot undoes every mount; the daemon does not know.
    let status = Command::new("umount").arg(&dir).status().unwrap();
    assert!(status.success());
    assert_eq!(mount_of(&dir), None);
    assert!(!dir.join("upper").exists(), "the layer is in the image");

    let out = moat(&[
        "sandbox",
        "run",
        &sb.name,
        "--",
        "-c",
        "cat /etc/marker; dd if=/dev/zero of=/tmp/x bs=1M count=200 2>&1 | grep -c 'No space left'",
    ]);
    assert_eq!(text(&out.stdout), "kept\n1\n", "{}", text(&out.stderr));
    assert!(mount_of(&dir).is_some(), "started again on its image");
    assert_eq!(sb.inspect()["limits"]["disk"]["enforced"], true);
}

#[test]
fn bad_disk_values_get_one_line_errors_and_leave_no_sandbox() {
    let _serial = serial();
    ensure_template();
    let ws = tempfile::tempdir_in("/tmp").unwrap();
    let w = ws.path().to_str().unwrap();
    for (value, want) in [
        ("12q", "--disk: \"12q\" is not a size: write e.g. 512m or 4g"),
        ("1k", "--disk: a disk budget of 1k is too small: a sandbox needs at least 32m; give e.g. --disk 10g, or --disk 0 for no budget"),
        ("31m", "too small"),
    ] {
        let name = unique("baddisk");
        for args in [
            vec!["sandbox", "create", "--name", &name, "--disk", value, "shell", w],
            vec!["sandbox", "run", "--name", &name, "--disk", value, "shell", w, "--", "-c", "true"],
        ] {
            let out = moat(&args);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
            assert!(err.contains(want), "{args:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
            assert!(
                !moat_ok(&["sandbox", "ls", "-q"]).lines().any(|l| l == name),
                "{args:?} left a sandbox"
            );
        }
    }
    // `0` is no budget at all.
    let sb = Sandbox::with_args("nodisk", &["--disk", "0"]);
    let disk = sb.inspect()["limits"]["disk"].clone();
    assert_eq!(
        (disk["bytes"].clone(), disk["enforced"].clone()),
        (json!(null), json!(false))
    );
    assert_eq!(
        mount_of(&state_dir(sb.inspect()["id"].as_str().unwrap())),
        None
    );
}

#[test]
fn a_sandbox_an_older_moat_made_keeps_working_without_a_budget() {
    let _serial = serial();
    let sb = Sandbox::with_args("olddisk", &["--disk", "0"]);
    moat_ok(&["sandbox", "stop", &sb.name]);
    // What an older moat stored: limits without a disk budget, and no image.
    let db = roots().0.join("moat.db");
    let edit = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], timeout=10)\n\
             c.execute(\"UPDATE sandboxes SET limits = json_remove(limits, '$.disk') WHERE name = ?\", (sys.argv[2],))\n\
             c.commit()",
            db.to_str().unwrap(),
            &sb.name,
        ])
        .output()
        .unwrap();
    assert!(edit.status.success(), "{}", text(&edit.stderr));
    let disk = sb.inspect()["limits"]["disk"].clone();
    assert_eq!(
        disk,
        json!({"bytes": null, "enforced": false, "by": "no budget: the sandbox was made by an older moat, without a disk image"})
    );
    let out = moat(&["sandbox", "run", &sb.name, "--", "-c", "echo ok"]);
    assert_eq!(text(&out.stdout), "ok\n", "{}", text(&out.stderr));
    assert_eq!(sb.inspect()["limits"]["disk"], disk);
    assert_eq!(
        mount_of(&state_dir(sb.inspect()["id"].as_str().unwrap())),
        None
    );
}

/// Removes this test's sandboxes, stops its daemon and deletes its roots.
struct CleanRoots;

impl Drop for CleanRoots {
    fn drop(&mut self) {
        let _ = moat(&["sandbox", "reset", "-f"]);
        stop_daemon();
        let (state, runtime) = roots();
        // An image the pool was making as the daemon died is still mounted
        // beside it (the next daemon would undo that).
        if let Ok(d) = std::fs::read_dir(state.join("disk-pool")) {
            for e in d.flatten().filter(|e| mount_of(&e.path()).is_some()) {
                let _ = Command::new("umount").arg("-l").arg(e.path()).status();
            }
        }
        // Never into a mount that is still there.
        let mounted = ["sandboxes", "disk-pool"].iter().any(|sub| {
            std::fs::read_dir(state.join(sub))
                .map(|d| d.flatten().any(|e| mount_of(&e.path()).is_some()))
                .unwrap_or(false)
        });
        if !mounted {
            let _ = std::fs::remove_dir_all(state);
            let _ = std::fs::remove_dir_all(runtime);
        }
    }
}

#[test]
fn default_limits_apply_show_in_inspect_and_hold() {
    let _serial = serial();
    let _daemon = fresh_isolated_roots("disk-defaults");
    let _clean = CleanRoots;
    let env: Vec<(&str, &std::ffi::OsStr)> = vec![
        ("MOAT_SANDBOX_MEMORY", "256m".as_ref()),
        ("MOAT_SANDBOX_PIDS_LIMIT", "64".as_ref()),
        ("MOAT_SANDBOX_DISK", "64m".as_ref()),
    ];
    start_daemon_with(&env);
    let sb = Sandbox::new("defaults");
    let info = sb.inspect();
    let limits = &info["limits"];
    assert_eq!(
        (
            limits["memory"].clone(),
            limits["pids"].clone(),
            limits["enforced"].clone(),
            limits["disk"].clone()
        ),
        (
            json!(256 * MIB),
            json!(64),
            json!(true),
            json!({"bytes": 64 * MIB, "enforced": true, "by": "ext4 image on a loop device"})
        ),
        "{limits}"
    );
    assert!(
        limits["cpus"].as_f64().is_some_and(|c| c >= 1.0),
        "{limits}"
    );

    // A fork bomb is held by the default PID limit.
    let out = python_in_sandbox(
        &sb,
        r#"
import errno, os, signal, time
children, err = [], None
while len(children) < 10000:
    try:
        pid = os.fork()
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for c in children:
    os.kill(c, signal.SIGKILL)
for c in children:
    os.waitpid(c, 0)
print(len(children), err)
"#,
        false,
    );
    let said = text(&out.stdout);
    let words: Vec<&str> = said.split_whitespace().collect();
    assert_eq!(
        words.get(1),
        Some(&"EAGAIN"),
        "{said} {}",
        text(&out.stderr)
    );
    assert!(words[0].parse::<u32>().unwrap() < 64, "{said}");

    // A memory hog is held by the default memory limit.
    let out = python_in_sandbox(
        &sb,
        r#"
chunks = []
for i in range(1024):
    chunks.append(b"\x01" * (1 << 20))  # touched, not just reserved
print("ALLOCATED")
"#,
        false,
    );
    assert!(
        !text(&out.stdout).contains("ALLOCATED") && !out.status.success(),
        "1 GiB allocated under a 256 MiB limit: {:?} {}",
        out.status.code(),
        text(&out.stderr)
    );
    // The default disk budget holds too.
    assert_enospc(
        &fill(&sb, "/tmp/x", 200),
        "200 MiB under the default budget",
    );
    assert!(sb.sh("echo alive").status.success());

    // The daemon dies while the host "reboots" (the mount goes); the next
    // daemon mounts the image again as it starts, before anything asks.
    assert!(sb.root_sh("echo kept > /etc/marker").status.success());
    moat_ok(&["sandbox", "stop", &sb.name]);
    stop_daemon();
    let dir = state_dir(info["id"].as_str().unwrap());
    assert!(Command::new("umount").arg(&dir).status().unwrap().success());
    start_daemon_with(&env);
    assert!(mount_of(&dir).is_some(), "the new daemon mounted the image");
    let out = moat(&["sandbox", "run", &sb.name, "--", "-c", "cat /etc/marker"]);
    assert_eq!(text(&out.stdout), "kept\n", "{}", text(&out.stderr));
}

// ---- images made ahead ----

/// What the pool keeps ready.
const POOL_SIZE: usize = 2;

fn pool_env() -> Vec<(&'static str, &'static std::ffi::OsStr)> {
    vec![("MOAT_SANDBOX_DISK", "64m".as_ref())]
}

/// The pool's directory in this test's state root.
fn pool_dir() -> PathBuf {
    std::fs::canonicalize(&roots().0).unwrap().join("disk-pool")
}

/// The pool's image files, with their inode numbers.
fn pool_images() -> Vec<(PathBuf, u64)> {
    let Ok(dir) = std::fs::read_dir(pool_dir()) else {
        return vec![];
    };
    let mut images: Vec<(PathBuf, u64)> = dir
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "img"))
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.ino())))
        .collect();
    images.sort();
    images
}

/// `losetup -a`'s lines of images in the pool's directory (gone ones too).
fn pool_loops() -> Vec<String> {
    losetup_lines(&format!("{}/", pool_dir().display()))
}

/// The pool, once it is full: its images, each on a loop device of its
/// own, and nothing being made (no mount point beside them).
fn pool_full() -> Vec<(PathBuf, u64)> {
    let full = || {
        let entries = std::fs::read_dir(pool_dir()).map_or(0, |d| d.count());
        let loops = pool_loops();
        pool_images().len() == POOL_SIZE
            && entries == POOL_SIZE
            && loops.len() == POOL_SIZE
            && !loops.iter().any(|l| l.contains("(deleted)"))
    };
    assert!(
        eventually(full),
        "the pool is not full: {:?}, {:?}",
        std::fs::read_dir(pool_dir()).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>()),
        pool_loops()
    );
    // Between taking its mount point away and being handed out.
    std::thread::sleep(Duration::from_millis(100));
    pool_images()
}

/// The inode number of the file behind the one loop device of `image`.
fn loop_inode(image: &Path) -> u64 {
    let lines = loop_devices_of(image);
    assert_eq!(lines.len(), 1, "{} is on {lines:?}", image.display());
    // /dev/loop6: [65024]:10674180 (/path/disk.img)
    lines[0]
        .split("]:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no inode in {}", lines[0]))
}

/// A sandbox whose image came from the pool: held to its budget, with the
/// mount, owner and mode of one made at create.
fn check_pooled(sb: &Sandbox, pool: &[(PathBuf, u64)]) -> (PathBuf, u64, String) {
    let info = sb.inspect();
    assert_eq!(
        info["limits"]["disk"],
        json!({"bytes": 64 * MIB, "enforced": true, "by": "ext4 image on a loop device"})
    );
    let dir = state_dir(info["id"].as_str().unwrap());
    let mount = mount_of(&dir).expect("the state directory is a mount");
    assert!(
        mount.contains(" - ext4 /dev/loop") && mount.contains("nosuid") && mount.contains("nodev"),
        "{mount}"
    );
    let device = mount.split(" - ext4 ").nth(1).unwrap();
    let device = device.split(' ').next().unwrap().to_string();
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o700, "{}", dir.display());
    assert_ne!(meta.uid(), 0, "the sandbox's root owns its layer");
    let image = dir.join("disk.img");
    let ino = loop_inode(&image);
    assert!(
        pool.iter().any(|(_, i)| *i == ino),
        "the image of {} ({ino}) is not one of the pool's: {pool:?}",
        sb.name
    );
    (image, ino, device)
}

#[test]
fn a_sandbox_given_an_image_made_ahead_is_held_to_its_budget_and_two_at_once_get_two() {
    let _serial = serial();
    let _daemon = fresh_isolated_roots("disk-pool");
    let _clean = CleanRoots;
    start_daemon_with(&pool_env());
    ensure_template();

    let pool = pool_full();
    let sb = Sandbox::new("pooled");
    let (image, ino, _) = check_pooled(&sb, &pool);
    assert_enospc(&fill(&sb, "/tmp/x", 200), "200 MiB into /tmp");
    let out =
        sb.sh("rm /tmp/x && dd if=/dev/zero of=/tmp/y bs=1M count=8 2>/dev/null && echo wrote");
    assert_eq!(text(&out.stdout), "wrote\n", "{}", text(&out.stderr));
    // The pool is full again, with new images.
    let pool = pool_full();
    assert!(!pool.iter().any(|(_, i)| *i == ino), "{pool:?}");
    // rm: nothing of it is left, under its own name or the pool's.
    moat_ok(&["sandbox", "rm", &sb.name]);
    let dir = image.parent().unwrap();
    assert_eq!(mount_of(dir), None);
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        eventually(|| losetup_lines(&format!("]:{ino} ")).is_empty()),
        "loop devices left: {:?}",
        losetup_lines(&format!("]:{ino} "))
    );

    // Two creates at once: each gets an image of its own, both from the pool.
    let pool = pool_full();
    let ws: Vec<tempfile::TempDir> = (0..2)
        .map(|_| tempfile::tempdir_in("/tmp").unwrap())
        .collect();
    let names: Vec<String> = (0..2).map(|_| unique("pooled-at-once")).collect();
    let children: Vec<std::process::Child> = names
        .iter()
        .zip(&ws)
        .map(|(name, w)| {
            moat_cmd()
                .args(["sandbox", "create", "--name", name, "shell"])
                .arg(w.path())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let sandboxes: Vec<Sandbox> = children
        .into_iter()
        .zip(names)
        .zip(ws)
        .map(|((child, name), workspace)| {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{name}: {}", text(&out.stderr));
            Sandbox {
                name,
                workspace,
                rootless: None,
            }
        })
        .collect();
    let made: Vec<(PathBuf, u64, String)> =
        sandboxes.iter().map(|sb| check_pooled(sb, &pool)).collect();
    assert_ne!(made[0].1, made[1].1, "one image for two sandboxes");
    assert_ne!(made[0].2, made[1].2, "one loop device for two sandboxes");
    // Each is its own budget: one full, the other still writes.
    assert_enospc(
        &fill(&sandboxes[0], "/tmp/x", 200),
        "200 MiB into the first",
    );
    let out = sandboxes[1].sh("dd if=/dev/zero of=/tmp/y bs=1M count=32 2>/dev/null && echo wrote");
    assert_eq!(text(&out.stdout), "wrote\n", "{}", text(&out.stderr));
    for sb in &sandboxes {
        moat_ok(&["sandbox", "rm", &sb.name]);
    }
    for (image, ino, _) in &made {
        assert!(!image.exists());
        assert!(
            eventually(|| losetup_lines(&format!("]:{ino} ")).is_empty()),
            "loop devices left: {:?}",
            losetup_lines(&format!("]:{ino} "))
        );
    }
}

#[test]
fn a_killed_daemon_leaves_no_image_made_ahead_mounted_and_the_next_fills_its_own() {
    let _serial = serial();
    let _daemon = fresh_isolated_roots("disk-pool-restart");
    let _clean = CleanRoots;
    start_daemon_with(&pool_env());
    let old = pool_full();

    // The pool's mounts go with the daemon that held them.
    stop_daemon();
    assert!(
        eventually(|| pool_loops().is_empty()),
        "loop devices of a dead daemon's pool: {:?}",
        pool_loops()
    );
    // As a daemon killed while it made an image leaves it: mounted beside it.
    let half = pool_dir().join("1-9.img");
    let at = pool_dir().join("1-9");
    let f = std::fs::File::create(&half).unwrap();
    f.set_len(64 * MIB).unwrap();
    drop(f);
    let mkfs = Command::new("mkfs.ext4")
        .arg("-qF")
        .arg(&half)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", text(&mkfs.stderr));
    std::fs::create_dir(&at).unwrap();
    let ok = Command::new("mount")
        .arg("-oloop")
        .arg(&half)
        .arg(&at)
        .status()
        .unwrap();
    assert!(ok.success());
    assert_eq!(loop_devices_of(&half).len(), 1);

    start_daemon_with(&pool_env());
    let new = pool_full();
    assert_eq!(mount_of(&at), None, "the half-made image is unmounted");
    assert!(
        !at.exists() && !half.exists(),
        "the half-made image is removed"
    );
    assert!(
        eventually(|| loop_devices_of(&half).is_empty()),
        "{:?}",
        loop_devices_of(&half)
    );
    assert!(
        !new.iter().any(|n| old.iter().any(|o| o.0 == n.0)),
        "{old:?} {new:?}"
    );
    // Each image on one loop device, and nothing of the pool in the mount table.
    let loops = pool_loops();
    assert_eq!(loops.len(), POOL_SIZE, "{loops:?}");
    for (image, _) in &new {
        assert_eq!(loop_devices_of(image).len(), 1, "{loops:?}");
    }
    let pool = pool_dir().display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&pool), "{mountinfo}");

    // The new pool's images serve.
    let sb = Sandbox::new("after-restart");
    check_pooled(&sb, &new);
    assert_eq!(text(&sb.sh("echo ok").stdout), "ok\n");
    drop(sb);
    stop_daemon();
    assert!(
        eventually(|| pool_loops().is_empty()),
        "loop devices of a dead daemon's pool: {:?}",
        pool_loops()
    );
}

// ---- rootless ----

#[test]
fn rootless_a_disk_budget_is_not_enforced_and_create_says_so() {
    let _serial = serial();
    assert!(
        nix::unistd::geteuid().is_root(),
        "the rootless tests switch users and must start as root"
    );
    let r = Rootless::setup("disk");
    let w = r.dir.join("ws");
    let out = r.moat(&[
        "sandbox",
        "create",
        "--name",
        "rld",
        "--disk",
        "64m",
        "shell",
        w.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let said: Vec<&str> = err.lines().filter(|l| l.contains("disk budget")).collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(
        said[0].contains("rld (64m) is not enforced") && said[0].contains("rootless"),
        "{err}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&text(&r.moat(&["sandbox", "inspect", "rld"]).stdout)).unwrap();
    let disk = &info[0]["limits"]["disk"];
    assert_eq!(
        (disk["bytes"].clone(), disk["enforced"].clone()),
        (json!(64 * MIB), json!(false)),
        "{disk}"
    );
    assert!(disk["by"].as_str().unwrap().contains("rootless"), "{disk}");
    // The in-memory file system is held to its share all the same.
    let out = r.moat(&[
        "sandbox",
        "exec",
        "rld",
        "sh",
        "-c",
        "df -k --output=size /dev/shm | tail -1 | tr -d ' '; dd if=/dev/zero of=/dev/shm/x bs=1M count=200 2>&1 | grep -c 'No space left'",
    ]);
    assert_eq!(text(&out.stdout), "16384\n1\n", "{}", text(&out.stderr));
}

//! Attacks on `sandbox save` from inside a sandbox, replayed on an upper
//! directory made here: sparse files that would expand to gigabytes, files
//! named like whiteouts, set-id bits and file capabilities the image did
//! not have.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::ImageError;
use crate::{drop_new_privileges, unpack_layer, write_upper_layer};
use nix::sys::stat::{mknod, Mode, SFlag};

/// Writes `upper` as a layer file next to it and returns its path.
fn save(upper: &Path) -> Result<(PathBuf, Vec<String>), ImageError> {
    let layer = upper.with_extension("tar");
    let mut out = File::create(&layer).unwrap();
    let summary = write_upper_layer(upper, 1_000, &mut out)?;
    Ok((layer, summary.skipped))
}

/// (path, type, mode) of every entry of a layer file.
fn entries(layer: &Path) -> Vec<(String, char, u32)> {
    let mut archive = tar::Archive::new(File::open(layer).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                e.path().unwrap().display().to_string(),
                h.entry_type().as_byte() as char,
                h.mode().unwrap(),
            )
        })
        .collect()
}

fn set_xattr(path: &Path, key: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let k = CString::new(key).unwrap();
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "{key} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

const GB_HOLE: u64 = 3500 << 20;

#[test]
fn a_sparse_file_saves_small_and_unpacks_sparse_with_the_same_content() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir(&upper).unwrap();
    // `truncate -s 3500M f; echo x >> f`
    let mut f = File::create(upper.join("f")).unwrap();
    f.set_len(GB_HOLE).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"x\n").unwrap();
    // Many islands, more than fit in the GNU header's map (4) and in one
    // extension block (21), with data at the very start.
    let mut islands = File::create(upper.join("islands")).unwrap();
    for i in 0..30u64 {
        islands.seek(SeekFrom::Start(i * (2 << 20))).unwrap();
        islands.write_all(format!("island {i}").as_bytes()).unwrap();
    }
    islands.set_len(61 << 20).unwrap();
    drop((f, islands));

    let (layer, warnings) = save(&upper).unwrap();
    assert_eq!(warnings, Vec::<String>::new());
    let size = fs::metadata(&layer).unwrap().len();
    // 4 KiB blocks of data for each of 31 runs, plus headers.
    assert!(size < 160 << 10, "the layer is {size} bytes");
    assert_eq!(
        entries(&layer)
            .iter()
            .map(|(p, t, _)| (p.as_str(), *t))
            .collect::<Vec<_>>(),
        vec![("f", 'S'), ("islands", 'S')]
    );

    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    unpack_layer(&layer, &dest).unwrap();
    let back = fs::metadata(dest.join("f")).unwrap();
    assert_eq!(back.len(), GB_HOLE + 2);
    assert!(
        back.blocks() < 1024,
        "written with {} blocks",
        back.blocks()
    );
    let mut tail = [0u8; 4];
    let back_file = File::open(dest.join("f")).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&back_file, &mut tail, GB_HOLE - 2).unwrap();
    assert_eq!(&tail, b"\0\0x\n");
    assert_eq!(
        fs::read(dest.join("islands")).unwrap(),
        fs::read(upper.join("islands")).unwrap()
    );

    // An independent reader, GNU tar, sees the same files.
    let gnu = tmp.path().join("gnu");
    fs::create_dir(&gnu).unwrap();
    let out = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&layer)
        .arg("-C")
        .arg(&gnu)
        .output()
        .expect("GNU tar is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::metadata(gnu.join("f")).unwrap().len(), GB_HOLE + 2);
    assert_eq!(
        fs::read(gnu.join("islands")).unwrap(),
        fs::read(upper.join("islands")).unwrap()
    );
}

#[test]
fn a_layer_whose_sparse_files_expand_past_the_limit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    let ext = crate::sparse::make_sparse_header(&mut h, &[], 2 << 40).unwrap();
    b.append_data(&mut h, "huge", &ext[..]).unwrap();
    let blob = tmp.path().join("layer.tar");
    fs::write(&blob, b.into_inner().unwrap()).unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    match unpack_layer(&blob, &dest) {
        Err(ImageError::UnsafeEntry { entry, reason }) => {
            assert_eq!(entry, "huge");
            assert!(reason.contains("1.0 TiB"), "{reason}");
        }
        other => panic!("expected UnsafeEntry, got {other:?}"),
    }
    assert!(!dest.join("huge").exists());

    // Save refuses the same, naming the file, before the layer is used.
    let upper = tmp.path().join("upper");
    fs::create_dir(&upper).unwrap();
    File::create(upper.join("big"))
        .unwrap()
        .set_len(2 << 40)
        .unwrap();
    match save(&upper) {
        Err(e @ ImageError::SparseTooLarge { .. }) => {
            let msg = e.to_string();
            assert!(msg.starts_with("/big in the sandbox"), "{msg}");
            assert!(!msg.contains('\n'));
        }
        other => panic!("expected SparseTooLarge, got {:?}", other.map(|r| r.1)),
    }
}

#[test]
fn files_named_like_whiteouts_refuse_the_save_and_real_markers_become_whiteouts() {
    for (evil, kind) in [
        ("etc/.wh.passwd", "file"),
        ("etc/.wh..wh..opq", "file"),
        ("etc/.wh.dir", "dir"),
        ("etc/.wh.link", "link"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("etc")).unwrap();
        fs::write(upper.join("etc/hosts"), b"ok").unwrap();
        let path = upper.join(evil);
        match kind {
            "file" => fs::write(&path, b"").unwrap(),
            "dir" => fs::create_dir(&path).unwrap(),
            _ => std::os::unix::fs::symlink("x", &path).unwrap(),
        }
        match save(&upper) {
            Err(e @ ImageError::ReservedName { .. }) => {
                let msg = e.to_string();
                assert!(msg.starts_with(&format!("/{evil} in the sandbox")), "{msg}");
                assert!(msg.contains("rename or remove it"), "{msg}");
                assert!(!msg.contains('\n'));
            }
            other => panic!(
                "{evil}: expected ReservedName, got {:?}",
                other.map(|r| r.1)
            ),
        }
    }

    // The overlay's own markers: a 0/0 device, and either opaque xattr.
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    for d in ["etc", "user-opq", "trusted-opq"] {
        fs::create_dir_all(upper.join(d)).unwrap();
    }
    mknod(&upper.join("etc/passwd"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
    set_xattr(&upper.join("user-opq"), "user.overlay.opaque", b"y");
    set_xattr(&upper.join("trusted-opq"), "trusted.overlay.opaque", b"y");
    let (layer, _) = save(&upper).unwrap();
    let names: Vec<String> = entries(&layer).into_iter().map(|e| e.0).collect();
    assert_eq!(
        names,
        vec![
            "etc",
            "etc/.wh.passwd",
            "trusted-opq",
            "trusted-opq/.wh..wh..opq",
            "user-opq",
            "user-opq/.wh..wh..opq"
        ]
    );
}

/// A v2 file capability granting cap_net_raw, as `setcap cap_net_raw+ep` writes it.
const CAP_NET_RAW: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

#[test]
fn file_capabilities_are_never_archived_and_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir_all(upper.join("usr/bin")).unwrap();
    fs::write(upper.join("usr/bin/ping"), b"#!ping").unwrap();
    set_xattr(
        &upper.join("usr/bin/ping"),
        "security.capability",
        &CAP_NET_RAW,
    );
    let (layer, warnings) = save(&upper).unwrap();
    assert_eq!(
        warnings,
        vec!["/usr/bin/ping is saved without its file capability (security.capability): a sandbox cannot grant one to an image"]
    );
    // No PAX records at all, so no SCHILY.xattr.security.capability.
    assert!(entries(&layer)
        .iter()
        .all(|(_, t, _)| *t != 'x' && *t != 'g'));
    let bytes = fs::read(&layer).unwrap();
    assert!(!bytes.windows(19).any(|w| w == b"security.capability"));
}

#[test]
fn set_id_bits_are_kept_only_where_the_image_had_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (l0, l1, upper) = (
        tmp.path().join("l0"),
        tmp.path().join("l1"),
        tmp.path().join("upper"),
    );
    for d in [&l0, &l1, &upper] {
        fs::create_dir_all(d.join("usr/bin")).unwrap();
    }
    // The image: setuid sudo, su and mount; gone deleted by the upper
    // layer, opt/o made opaque by it, sg not set-id at all.
    for (p, mode) in [
        ("usr/bin/sudo", 0o4755),
        ("usr/bin/su", 0o4755),
        ("usr/bin/mount", 0o4755),
        ("usr/bin/gone", 0o4755),
        ("usr/bin/sg", 0o755),
        ("opt/o/x", 0o4755),
    ] {
        let path = l0.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"lower").unwrap();
        chmod(&path, mode);
    }
    mknod(&l1.join("usr/bin/gone"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
    fs::create_dir_all(l1.join("opt/o")).unwrap();
    set_xattr(&l1.join("opt/o"), "user.overlay.opaque", b"y");

    // The sandbox: sudo, su and mount copied up, the rest made by it.
    for (p, mode) in [
        ("usr/bin/sudo", 0o4755),
        ("usr/bin/su", 0o4755),
        ("usr/bin/mount", 0o4755),
        ("usr/bin/evil", 0o4755),
        ("usr/bin/gone", 0o4755),
        ("usr/bin/sg", 0o6755),
        ("opt/o/x", 0o4711),
    ] {
        let path = upper.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"upper").unwrap();
        chmod(&path, mode);
    }
    // New names for setuid files: after the file in the layer's order, and
    // before it (then the new name is the file and the old one the link).
    let link = |from: &str, to: &str| fs::hard_link(upper.join(from), upper.join(to)).unwrap();
    link("usr/bin/evil", "usr/bin/zz-evil");
    link("usr/bin/su", "usr/bin/zz-su");
    link("usr/bin/mount", "usr/bin/a-mount");
    fs::create_dir(upper.join("usr/share")).unwrap();
    chmod(&upper.join("usr/share"), 0o2775);
    // A sparse set-id file: its header is patched like any other.
    let big = File::create(upper.join("usr/bin/big")).unwrap();
    big.set_len(8 << 20).unwrap();
    chmod(&upper.join("usr/bin/big"), 0o4755);

    let (layer, _) = save(&upper).unwrap();
    let lowers = vec![l0, l1];
    let warnings = drop_new_privileges(&layer, &lowers).unwrap();
    let not_given =
        |p: &str| format!("/{p} is saved without its setuid bit, which the image did not give it");
    let linked = |p: &str, to: &str| {
        format!("/{p} is saved without its setuid bit: the sandbox linked it to /{to}, which the image did not give one")
    };
    assert_eq!(
        warnings,
        vec![
            not_given("opt/o/x"),
            not_given("usr/bin/a-mount"),
            not_given("usr/bin/big"),
            not_given("usr/bin/evil"),
            not_given("usr/bin/gone"),
            linked("usr/bin/mount", "usr/bin/a-mount"),
            "/usr/bin/sg is saved without its setuid and setgid bits, which the image did not give it".to_string(),
            linked("usr/bin/su", "usr/bin/zz-su"),
            not_given("usr/bin/zz-evil"),
            not_given("usr/bin/zz-su"),
        ]
    );
    let modes: Vec<(String, char, u32)> = entries(&layer);
    let mode_of = |p: &str| modes.iter().find(|e| e.0 == p).map(|e| e.2);
    let paths = [
        "usr/bin/sudo",
        "usr/bin/su",
        "usr/bin/zz-su",
        "usr/bin/mount",
        "usr/bin/a-mount",
        "usr/bin/evil",
        "usr/bin/zz-evil",
        "usr/bin/gone",
        "usr/bin/sg",
        "usr/bin/big",
        "opt/o/x",
        "usr/share",
    ];
    let want = [
        0o4755, 0o755, 0o755, 0o755, 0o755, 0o755, 0o755, 0o755, 0o755, 0o755, 0o711, 0o2775,
    ];
    assert_eq!(paths.map(mode_of), want.map(Some));

    // The patched tar is whole (checksums hold), unpacks to those modes,
    // and a second pass finds nothing more to do.
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    unpack_layer(&layer, &dest).unwrap();
    let on_disk = |p: &str| fs::symlink_metadata(dest.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(paths.map(on_disk), want);
    assert_eq!(
        drop_new_privileges(&layer, &lowers).unwrap(),
        Vec::<String>::new()
    );
}

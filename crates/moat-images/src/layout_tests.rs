use super::*;
use crate::unpack::DirectUnpacker;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use sha2::{Digest, Sha256};

fn rootfs_tar(marker: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("./", tar::EntryType::Directory, 0o755, b"");
    add("etc/", tar::EntryType::Directory, 0o755, b"");
    add(
        "etc/os-release",
        tar::EntryType::Regular,
        0o644,
        marker.as_bytes(),
    );
    add("usr/bin/sudo", tar::EntryType::Regular, 0o4755, b"sudo");
    b.into_inner().unwrap()
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

struct Fixture {
    _tmp: tempfile::TempDir,
    store: ImageStore,
    root: PathBuf,
    input: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let input = tmp.path().join("input");
    fs::create_dir(&input).unwrap();
    Fixture {
        _tmp: tmp,
        store,
        root,
        input,
    }
}

impl Fixture {
    fn write_input(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.input.join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    fn names(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn layer_dir(&self, diff_id: &str) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(digest_hex(diff_id).unwrap())
    }
}

fn reference(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn import_list_get_layer_dirs_remove_round_trip() {
    let f = fixture();
    let tar = rootfs_tar("debian");
    let input = f.write_input("rootfs.tar", &tar);
    let shell = reference("shell");

    let info = f
        .store
        .import_rootfs(
            &input,
            &shell,
            "moat template shell",
            Default::default(),
            &DirectUnpacker,
        )
        .unwrap();
    let diff_id = sha(&tar);
    let expected = ImageInfo {
        reference: "shell:latest".into(),
        id: info.id.clone(),
        created: info.created.clone(),
        size: tar.len() as u64,
        layers: vec![diff_id.clone()],
    };
    assert_eq!(info, expected);
    assert_eq!(info.created.len(), "2024-01-01T00:00:00Z".len());
    // The id is the digest of the manifest blob that is on disk.
    let manifest_bytes = fs::read(
        f.root
            .join("blobs/sha256")
            .join(digest_hex(&info.id).unwrap()),
    )
    .unwrap();
    assert_eq!(sha(&manifest_bytes), info.id);

    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).unwrap();
    let config_bytes = fs::read(
        f.root
            .join("blobs/sha256")
            .join(digest_hex(&manifest.config.digest).unwrap()),
    )
    .unwrap();
    assert_eq!(
        manifest,
        Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_MANIFEST.into()),
            config: Descriptor::new(MEDIA_CONFIG, sha(&config_bytes), config_bytes.len() as u64),
            layers: vec![Descriptor::new(
                MEDIA_LAYER_TAR,
                diff_id.clone(),
                tar.len() as u64
            )],
            extra: serde_json::Map::new(),
        }
    );
    let config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
    assert_eq!(
        config,
        serde_json::json!({
            "created": info.created,
            "architecture": oci_arch(),
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": info.created, "created_by": "moat template shell"}],
        })
    );
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(f.root.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index,
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": MEDIA_MANIFEST,
                "digest": info.id,
                "size": manifest_bytes.len(),
                "annotations": {"org.opencontainers.image.ref.name": "shell:latest"},
            }],
        })
    );
    assert_eq!(
        fs::read_to_string(f.root.join("oci-layout"))
            .unwrap()
            .replace([' ', '\n'], ""),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );

    assert_eq!(f.store.list().unwrap(), vec![expected.clone()]);
    assert_eq!(f.store.get(&shell).unwrap(), Some(expected.clone()));
    assert_eq!(f.store.get(&reference("shell:v2")).unwrap(), None);

    let dirs = f.store.layer_dirs(&info, &DirectUnpacker).unwrap();
    assert_eq!(dirs, vec![f.layer_dir(&diff_id).join("rootfs")]);
    assert_eq!(
        fs::read_to_string(dirs[0].join("etc/os-release")).unwrap(),
        "debian"
    );
    assert_eq!(
        fs::metadata(dirs[0].join("usr/bin/sudo"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o4755
    );
    assert_eq!(
        f.names(&format!("layers/sha256/{}", digest_hex(&diff_id).unwrap())),
        vec!["complete", "rootfs"]
    );
    assert_eq!(
        f.names("blobs/sha256"),
        sorted(vec![
            digest_hex(&info.id).unwrap().to_string(),
            digest_hex(&manifest.config.digest).unwrap().to_string(),
            digest_hex(&diff_id).unwrap().to_string(),
        ])
    );

    assert_eq!(f.store.remove(&shell, &[]).unwrap(), expected);
    assert_eq!(f.store.list().unwrap(), Vec::<ImageInfo>::new());
    assert_eq!(f.names("blobs/sha256"), Vec::<String>::new());
    assert_eq!(f.names("layers/sha256"), Vec::<String>::new());
    assert!(matches!(
        f.store.remove(&shell, &[]),
        Err(ImageError::NotFound { reference }) if reference == "shell:latest"
    ));
}

#[test]
fn gzip_import_keeps_the_compressed_blob() {
    let f = fixture();
    let tar = rootfs_tar("gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&tar).unwrap();
    let gz = enc.finish().unwrap();
    let input = f.write_input("rootfs.tar.gz", &gz);

    let info = f
        .store
        .import_rootfs(
            &input,
            &reference("moat/gz:v1"),
            "test",
            Default::default(),
            &DirectUnpacker,
        )
        .unwrap();
    assert_eq!(
        info,
        ImageInfo {
            reference: "moat/gz:v1".into(),
            id: info.id.clone(),
            created: info.created.clone(),
            size: gz.len() as u64,
            layers: vec![sha(&tar)],
        }
    );
    let manifest: Manifest = f.store.read_json_blob(&info.id).unwrap();
    assert_eq!(
        manifest.layers,
        vec![Descriptor::new(MEDIA_LAYER_GZIP, sha(&gz), gz.len() as u64)]
    );
    assert_eq!(
        fs::read(
            f.root
                .join("blobs/sha256")
                .join(digest_hex(&sha(&gz)).unwrap())
        )
        .unwrap(),
        gz
    );
    let dirs = f.store.layer_dirs(&info, &DirectUnpacker).unwrap();
    assert_eq!(
        fs::read_to_string(dirs[0].join("etc/os-release")).unwrap(),
        "gz"
    );
}

#[test]
fn remove_keeps_layers_in_use_and_layers_shared_with_other_images() {
    let f = fixture();
    let tar = rootfs_tar("shared");
    let input = f.write_input("rootfs.tar", &tar);
    // Different history, so different manifests over the same layer.
    let a = f
        .store
        .import_rootfs(
            &input,
            &reference("a"),
            "ta",
            Default::default(),
            &DirectUnpacker,
        )
        .unwrap();
    let b = f
        .store
        .import_rootfs(
            &input,
            &reference("b"),
            "tb",
            Default::default(),
            &DirectUnpacker,
        )
        .unwrap();
    let diff_id = sha(&tar);

    f.store.remove(&reference("a"), &[]).unwrap();
    assert_eq!(f.store.list().unwrap(), vec![b.clone()]);
    assert_eq!(
        f.store.layer_dirs(&b, &DirectUnpacker).unwrap(),
        vec![f.layer_dir(&diff_id).join("rootfs")]
    );
    assert!(!f
        .root
        .join("blobs/sha256")
        .join(digest_hex(&a.id).unwrap())
        .exists());

    f.store
        .remove(&reference("b"), std::slice::from_ref(&diff_id))
        .unwrap();
    assert_eq!(f.names("blobs/sha256"), Vec::<String>::new());
    assert_eq!(
        f.names("layers/sha256"),
        vec![digest_hex(&diff_id).unwrap().to_string()]
    );
    assert!(f.layer_dir(&diff_id).join("complete").exists());

    // Once no sandbox uses it, the next sweep takes it.
    let c = f.write_input("other.tar", &rootfs_tar("other"));
    f.store
        .import_rootfs(
            &c,
            &reference("c"),
            "t",
            Default::default(),
            &DirectUnpacker,
        )
        .unwrap();
    f.store.remove(&reference("c"), &[]).unwrap();
    assert_eq!(f.names("layers/sha256"), Vec::<String>::new());
}

#[test]
fn corrupt_blob_is_caught_before_unpacking() {
    let f = fixture();
    let tar = rootfs_tar("corrupt");
    let input = f.write_input("rootfs.tar", &tar);
    let info = f
        .store
        .import_rootfs(
            &input,
            &reference("c"),
            "t",
            Default::default(),
            &DirectUnpacker,
        )
        .unwrap();
    let diff_id = sha(&tar);
    // Plain tar: the blob digest is the diff id.
    fs::remove_dir_all(f.layer_dir(&diff_id)).unwrap();
    let blob = f
        .root
        .join("blobs/sha256")
        .join(digest_hex(&diff_id).unwrap());
    let mut bytes = fs::read(&blob).unwrap();
    bytes[600] ^= 0x01;
    fs::write(&blob, bytes).unwrap();

    match f.store.layer_dirs(&info, &DirectUnpacker) {
        Err(ImageError::CorruptBlob { digest }) => assert_eq!(digest, diff_id),
        other => panic!("expected CorruptBlob, got {other:?}"),
    }
    assert_eq!(f.names("layers/sha256"), Vec::<String>::new());
    let message = ImageError::CorruptBlob { digest: diff_id }.to_string();
    assert!(message.contains("moat image rm"), "{message}");

    // Removing the image still works, and clears the bad blob.
    f.store.remove(&reference("c"), &[]).unwrap();
    assert_eq!(f.names("blobs/sha256"), Vec::<String>::new());
}

#[test]
fn broken_tarball_fails_import_and_leaves_nothing() {
    let f = fixture();
    let input = f.write_input("bad.tar", &[b'x'; 2048]);
    let result = f.store.import_rootfs(
        &input,
        &reference("bad"),
        "t",
        Default::default(),
        &DirectUnpacker,
    );
    assert!(
        matches!(result, Err(ImageError::BadLayer { .. })),
        "{result:?}"
    );
    assert_eq!(f.store.list().unwrap(), Vec::<ImageInfo>::new());
    assert_eq!(f.names("blobs/sha256"), Vec::<String>::new());
    assert_eq!(f.names("layers/sha256"), Vec::<String>::new());

    let unsafe_tar = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Fifo);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, "pipe", &b""[..]).unwrap();
        b.into_inner().unwrap()
    };
    let input = f.write_input("fifo.tar", &unsafe_tar);
    let result = f.store.import_rootfs(
        &input,
        &reference("bad"),
        "t",
        Default::default(),
        &DirectUnpacker,
    );
    assert!(
        matches!(&result, Err(ImageError::UnsafeEntry { entry, .. }) if entry == "pipe"),
        "{result:?}"
    );
    assert_eq!(f.names("blobs/sha256"), Vec::<String>::new());
    assert_eq!(f.names("layers/sha256"), Vec::<String>::new());
}

#[test]
fn reimport_replaces_the_name_and_drops_the_old_manifest() {
    let f = fixture();
    let one = f.write_input("one.tar", &rootfs_tar("one"));
    let two = f.write_input("two.tar", &rootfs_tar("two"));
    let old = f
        .store
        .import_rootfs(
            &one,
            &reference("x:1"),
            "t",
            Default::default(),
            &DirectUnpacker,
        )
        .unwrap();
    let new = f
        .store
        .import_rootfs(
            &two,
            &reference("x:1"),
            "t",
            Default::default(),
            &DirectUnpacker,
        )
        .unwrap();
    assert_ne!(old.id, new.id);
    assert_eq!(f.store.list().unwrap(), vec![new.clone()]);
    assert!(!f
        .root
        .join("blobs/sha256")
        .join(digest_hex(&old.id).unwrap())
        .exists());
    // The old unpacked layer stays until a remove is told what is in use.
    assert_eq!(f.names("layers/sha256").len(), 2);
}

#[test]
fn list_is_sorted_and_survives_concurrent_imports() {
    let f = fixture();
    let input = f.write_input("rootfs.tar", &rootfs_tar("c"));
    std::thread::scope(|s| {
        for name in ["zeta", "alpha", "mid:v2", "mid:v1"] {
            let (store, input) = (f.store.clone(), input.clone());
            s.spawn(move || {
                store
                    .import_rootfs(
                        &input,
                        &reference(name),
                        "t",
                        Default::default(),
                        &DirectUnpacker,
                    )
                    .unwrap()
            });
        }
    });
    let names: Vec<String> = f
        .store
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(
        names,
        vec!["alpha:latest", "mid:v1", "mid:v2", "zeta:latest"]
    );
}

#[test]
fn failed_unpacker_leaves_no_layer_dir() {
    struct Failing;
    impl LayerUnpacker for Failing {
        fn unpack(&self, _blob: &Path, dest: &Path) -> Result<(), ImageError> {
            fs::write(dest.join("partial"), b"x").unwrap();
            Err(ImageError::UnsafeEntry {
                entry: "e".into(),
                reason: "test".into(),
            })
        }
    }
    let f = fixture();
    let input = f.write_input("rootfs.tar", &rootfs_tar("f"));
    assert!(f
        .store
        .import_rootfs(&input, &reference("f"), "t", Default::default(), &Failing)
        .is_err());
    assert_eq!(f.names("layers/sha256"), Vec::<String>::new());
    assert_eq!(f.store.get(&reference("f")).unwrap(), None);
}

#[test]
fn open_sweeps_stale_temp_files_only() {
    let f = fixture();
    let blobs = f.root.join("blobs/sha256");
    let old = blobs.join("layer.tmp-1-1");
    let fresh = blobs.join("layer.tmp-1-2");
    let trash = f
        .root
        .join("layers/sha256")
        .join(format!("{}.tmp-rm-1-3", "a".repeat(64)));
    fs::write(&old, b"o").unwrap();
    fs::write(&fresh, b"f").unwrap();
    fs::create_dir(&trash).unwrap();
    let two_hours_ago = TimeSpecNow::ago(7200);
    nix::sys::stat::utimensat(
        None,
        &old,
        &two_hours_ago,
        &two_hours_ago,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    ImageStore::open(&f.root).unwrap();
    assert_eq!(f.names("blobs/sha256"), vec!["layer.tmp-1-2"]);
    assert_eq!(f.names("layers/sha256"), Vec::<String>::new());
}

#[test]
fn open_refuses_a_foreign_layout_version() {
    let f = fixture();
    fs::write(
        f.root.join("oci-layout"),
        br#"{"imageLayoutVersion":"9.0.0"}"#,
    )
    .unwrap();
    assert!(matches!(
        ImageStore::open(&f.root),
        Err(ImageError::CorruptStore { .. })
    ));
}

struct TimeSpecNow;
impl TimeSpecNow {
    fn ago(secs: u64) -> nix::sys::time::TimeSpec {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        nix::sys::time::TimeSpec::new((now - secs) as i64, 0)
    }
}

#[test]
fn opening_sweeps_partial_downloads_older_than_a_day() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let incoming = store.incoming_dir();
    fs::create_dir_all(&incoming).unwrap();
    for name in ["old", "fresh"] {
        fs::write(incoming.join(name), b"partial").unwrap();
    }
    let two_days_ago = nix::sys::time::TimeSpec::new(
        (SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 2 * 24 * 3600) as i64,
        0,
    );
    nix::sys::stat::utimensat(
        None,
        &incoming.join("old"),
        &two_days_ago,
        &two_days_ago,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    ImageStore::open(dir.path()).unwrap();
    let left: Vec<String> = fs::read_dir(&incoming)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["fresh".to_string()]);
}

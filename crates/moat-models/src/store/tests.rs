//! The store on small, hand-made GGUF files: what a package reads back as,
//! what is refused and left behind, tags and removal, reference spelling,
//! split models.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;

/// A metadata value for the GGUF builder.
enum Kv<'a> {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(&'a str),
    I32s(&'a [i32]),
    Strs(&'a [&'a str]),
}

/// A valid GGUF: the metadata given, then one Q4_0 tensor of `blocks` blocks.
fn gguf(kvs: &[(&str, Kv<'_>)], blocks: u64) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (key, value) in kvs {
        s(&mut b, key);
        match value {
            Kv::U32(v) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&v.to_le_bytes());
            }
            Kv::F32(v) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&v.to_le_bytes());
            }
            Kv::Bool(v) => {
                b.extend_from_slice(&7u32.to_le_bytes());
                b.push(u8::from(*v));
            }
            Kv::Str(v) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                s(&mut b, v);
            }
            Kv::I32s(vs) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&5u32.to_le_bytes());
                b.extend_from_slice(&(vs.len() as u64).to_le_bytes());
                for v in *vs {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
            Kv::Strs(vs) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&8u32.to_le_bytes());
                b.extend_from_slice(&(vs.len() as u64).to_le_bytes());
                for v in *vs {
                    s(&mut b, v);
                }
            }
        }
    }
    s(&mut b, "w");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&(blocks * 32).to_le_bytes());
    b.extend_from_slice(&2u32.to_le_bytes()); // Q4_0
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.extend(std::iter::repeat_n(7u8, (blocks * 18) as usize));
    b
}

const TOKENS: [&str; 11] = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"];

fn llama(blocks: u64) -> Vec<u8> {
    gguf(
        &[
            ("general.architecture", Kv::Str("llama")),
            ("general.name", Kv::Str("Tiny")),
            ("general.file_type", Kv::U32(3)),
            ("llama.context_length", Kv::U32(8192)),
            ("llama.rope.freq_base", Kv::F32(100000.0)),
            ("tokenizer.ggml.add_bos_token", Kv::Bool(false)),
            ("llama.rope.dims", Kv::I32s(&[1, -2, 3])),
            ("tokenizer.ggml.tokens", Kv::Strs(&TOKENS)),
        ],
        blocks,
    )
}

fn shard(no: u32, count: u32) -> Vec<u8> {
    gguf(
        &[
            ("general.architecture", Kv::Str("llama")),
            ("general.file_type", Kv::U32(3)),
            ("split.no", Kv::U32(no)),
            ("split.count", Kv::U32(count)),
        ],
        u64::from(no) + 1,
    )
}

fn src(name: &str, bytes: Vec<u8>) -> Source {
    Source::new(name, std::io::Cursor::new(bytes))
}

fn store() -> (tempfile::TempDir, ModelStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(&dir.path().join("models")).unwrap();
    (dir, store)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn blob(store: &ModelStore, digest: &str) -> PathBuf {
    store.blob_path(digest).unwrap()
}

fn digest_of(bytes: &[u8]) -> String {
    sha256_digest(bytes)
}

#[test]
fn a_package_reads_back_as_it_went_in() {
    let (_dir, store) = store();
    let weights = llama(4);
    let before = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let model = store
        .package(
            vec![src("tiny.Q4_1.gguf", weights.clone())],
            "tiny:q4",
            PackageOptions {
                licenses: vec![src("LICENSE", b"MIT, of course".to_vec())],
                context_size: Some(2048),
                chat_template: Some(src("t.jinja", b"{{ messages }}".to_vec())),
            },
        )
        .unwrap();
    assert!(
        (before..=before + 5).contains(&model.created),
        "{}",
        model.created
    );
    let gguf_map: BTreeMap<String, String> = [
        ("general.architecture", "llama"),
        ("general.name", "Tiny"),
        ("general.file_type", "3"),
        ("llama.context_length", "8192"),
        ("llama.rope.freq_base", "100000.000000"),
        ("tokenizer.ggml.add_bos_token", "false"),
        ("llama.rope.dims", "1, -2, 3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let expected = Model {
        id: model.id.clone(),
        tags: vec!["ai/tiny:q4".into()],
        created: model.created,
        config: ModelConfig {
            format: "gguf".into(),
            quantization: "Q4_1".into(),
            parameters: "0.00 M".into(),
            architecture: "llama".into(),
            size: human_size_of(weights.len()),
            gguf: gguf_map,
            context_size: Some(2048),
            extra: serde_json::Map::new(),
        },
        gguf_paths: vec![blob(&store, &digest_of(&weights))],
        license: vec!["MIT, of course".into()],
        chat_template: Some("{{ messages }}".into()),
        size: weights.len() as u64 + 14 + 14,
    };
    assert_eq!(model, expected);
    assert_eq!(store.get("ai/tiny:q4").unwrap(), expected);
    assert_eq!(store.get("docker.io/ai/tiny:q4").unwrap(), expected);
    assert_eq!(store.get(&model.id).unwrap(), expected);
    assert_eq!(store.get(&model.id[7..19]).unwrap(), expected);
    assert_eq!(store.list().unwrap(), vec![expected.clone()]);
    assert_eq!(expected.config.context_length(), Some(2048));
    assert_eq!(std::fs::read(&expected.gguf_paths[0]).unwrap(), weights);

    // On disk, DMR's layout and media types.
    let root = store.root();
    assert_eq!(
        names(root),
        vec![
            "blobs",
            "incoming",
            "layout.json",
            "manifests",
            "models.json",
            "models.lock"
        ]
    );
    assert!(names(&store.incoming_dir()).is_empty());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("models.json")).unwrap()).unwrap();
    let hex = &model.id[7..];
    let manifest_bytes = std::fs::read(root.join("manifests/sha256").join(hex)).unwrap();
    assert_eq!(digest_of(&manifest_bytes), model.id);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let media: Vec<(&str, &str)> = layers
        .iter()
        .map(|l| {
            (
                l["mediaType"].as_str().unwrap(),
                l["annotations"]["org.cncf.model.filepath"]
                    .as_str()
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(
        media,
        vec![
            ("application/vnd.docker.ai.gguf.v3", "tiny.Q4_1.gguf"),
            ("application/vnd.docker.ai.license", "LICENSE"),
            ("application/vnd.docker.ai.chat.template.jinja", "t.jinja"),
        ]
    );
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.ai.model.config.v0.1+json"
    );
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&store, config_digest)).unwrap()).unwrap();
    let layer_digests: Vec<&str> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(config["rootfs"]["type"], "rootfs");
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!(layer_digests)
    );
    assert!(config["descriptor"]["created"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let mut files = layer_digests.clone();
    files.push(config_digest);
    assert_eq!(
        index,
        serde_json::json!({"models": [{"id": model.id, "tags": ["ai/tiny:q4"], "files": files}]})
    );
}

fn human_size_of(n: usize) -> String {
    config::human_size(n as u64)
}

#[test]
fn a_corrupt_or_truncated_gguf_is_refused_and_leaves_nothing() {
    let (_dir, store) = store();
    let good = llama(4);
    let cases = [
        ("cut.gguf", good[..good.len() - 1].to_vec(), "truncated"),
        (
            "zip.gguf",
            b"PK\x03\x04 not a model".to_vec(),
            "not a GGUF file",
        ),
        ("header.gguf", good[..40].to_vec(), "truncated or corrupt"),
    ];
    for (name, bytes, why) in cases {
        let err = store
            .package(vec![src(name, bytes)], "broken", PackageOptions::default())
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, StoreError::BadGguf { name: n, .. } if n == name) && text.contains(why),
            "{name}: {text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }
    // A good first shard does not let a bad second one in.
    let err = store
        .package(
            vec![src("a", shard(0, 2)), src("b", shard(1, 2)[..50].to_vec())],
            "broken",
            PackageOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::BadGguf { .. }), "{err}");
    assert!(names(&store.blobs_dir()).is_empty());
    assert!(names(&store.manifests_dir()).is_empty());
    assert!(names(&store.incoming_dir()).is_empty());
    assert_eq!(store.list().unwrap(), vec![]);
    let missing = store.get("broken").unwrap_err();
    assert_eq!(
        missing.to_string(),
        "model broken not found; run `moat model pull broken` to fetch it (`moat model ls` lists the models there are)"
    );
}

#[test]
fn tags_move_and_removal_keeps_what_others_need() {
    let (_dir, store) = store();
    let weights = llama(2);
    let package = |tag: &str, context: u64| {
        store
            .package(
                vec![src("w.gguf", weights.clone())],
                tag,
                PackageOptions {
                    context_size: Some(context),
                    ..PackageOptions::default()
                },
            )
            .unwrap()
    };
    let one = package("one", 1024);
    let two = package("two", 2048);
    assert_ne!(one.id, two.id);
    assert_eq!(one.gguf_paths, two.gguf_paths, "one blob for both");

    let tagged = store.tag("one", "localhost:5000/team/one:v1").unwrap();
    assert_eq!(
        tagged.tags,
        vec!["ai/one:latest", "localhost:5000/team/one:v1"]
    );
    // By id, a model with two tags goes only with force.
    let err = store.remove(&one.id, false).unwrap_err();
    assert!(matches!(err, StoreError::MultipleTags { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    // A tag at a time: the model stays while a tag is left.
    assert_eq!(
        store.remove("ai/one", false).unwrap(),
        Removed {
            untagged: vec!["ai/one:latest".into()],
            deleted: None
        }
    );
    assert_eq!(
        store.get(&one.id).unwrap().tags,
        vec!["localhost:5000/team/one:v1"]
    );
    // A tag given to another model leaves this one.
    store.tag("two", "localhost:5000/team/one:v1").unwrap();
    assert_eq!(store.get(&one.id).unwrap().tags, Vec::<String>::new());
    assert_eq!(
        store.get("two").unwrap().tags,
        vec!["ai/two:latest", "localhost:5000/team/one:v1"]
    );
    // The untagged model goes by id; the shared weights stay for `two`.
    assert_eq!(
        store.remove(&one.id[7..19], false).unwrap(),
        Removed {
            untagged: vec![],
            deleted: Some(one.id.clone())
        }
    );
    assert!(two.gguf_paths[0].exists());
    assert_eq!(
        store.remove(&two.id, true).unwrap(),
        Removed {
            untagged: vec!["ai/two:latest".into(), "localhost:5000/team/one:v1".into()],
            deleted: Some(two.id.clone())
        }
    );
    assert!(names(&store.blobs_dir()).is_empty());
    assert!(names(&store.manifests_dir()).is_empty());
    assert!(matches!(
        store.remove("two", false),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn references_have_one_spelling() {
    let cases = [
        (
            "smollm2",
            "ai/smollm2:latest",
            "docker.io/ai/smollm2:latest",
        ),
        (
            "ai/smollm2:135M-Q4_1",
            "ai/smollm2:135M-Q4_1",
            "docker.io/ai/smollm2:135M-Q4_1",
        ),
        (
            "docker.io/ai/smollm2",
            "ai/smollm2:latest",
            "docker.io/ai/smollm2:latest",
        ),
        (
            "index.docker.io/smollm2:x",
            "ai/smollm2:x",
            "docker.io/ai/smollm2:x",
        ),
        (
            "localhost:5000/ai/smollm2:135M-Q4_1",
            "localhost:5000/ai/smollm2:135M-Q4_1",
            "localhost:5000/ai/smollm2:135M-Q4_1",
        ),
        ("me/model", "me/model:latest", "docker.io/me/model:latest"),
    ];
    let got: Vec<(String, String)> = cases
        .iter()
        .map(|(input, _, _)| {
            let r = ModelReference::parse(input).unwrap();
            (r.to_string(), r.remote().to_string())
        })
        .collect();
    let want: Vec<(String, String)> = cases
        .iter()
        .map(|(_, local, remote)| (local.to_string(), remote.to_string()))
        .collect();
    assert_eq!(got, want);
    let hex = "ab".repeat(32);
    let pinned = ModelReference::parse(&format!("smollm2@sha256:{hex}")).unwrap();
    assert_eq!(
        (pinned.to_string(), pinned.digest()),
        (
            format!("ai/smollm2@sha256:{hex}"),
            Some(format!("sha256:{hex}").as_str())
        )
    );
    for bad in ["", "SmolLM2", "a b", "ai/x:"] {
        let err = ModelReference::parse(bad).unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidReference { reference, .. } if reference == bad),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_split_model_is_kept_together_in_shard_order() {
    let (_dir, store) = store();
    let (a, b, c) = (shard(0, 3), shard(1, 3), shard(2, 3));
    let model = store
        .package(
            vec![
                src("m-00003-of-00003.gguf", c.clone()),
                src("m-00001-of-00003.gguf", a.clone()),
                src("m-00002-of-00003.gguf", b.clone()),
            ],
            "split",
            PackageOptions::default(),
        )
        .unwrap();
    assert_eq!(
        model.gguf_paths,
        vec![
            blob(&store, &digest_of(&a)),
            blob(&store, &digest_of(&b)),
            blob(&store, &digest_of(&c))
        ]
    );
    assert_eq!(model.config.parameters, "0.00 M");
    assert_eq!(
        model.config.size,
        human_size_of(a.len() + b.len() + c.len())
    );

    let refused = [
        (vec![src("m2", b.clone())], "shard 2 of 3"),
        (
            vec![src("m1", a.clone()), src("m2", b.clone())],
            "split in 3",
        ),
        (
            vec![
                src("m1", a.clone()),
                src("m1again", a.clone()),
                src("m3", c.clone()),
            ],
            "both shard 1",
        ),
        (
            vec![src("m1", shard(0, 2)), src("plain", llama(1))],
            "not a shard",
        ),
    ];
    for (sources, why) in refused {
        let err = store
            .package(sources, "bad-split", PackageOptions::default())
            .unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(names(&store.incoming_dir()).is_empty());
}

#[test]
fn threads_share_one_store() {
    fn shared<T: Send + Sync>() {}
    shared::<ModelStore>();
    let (_dir, store) = store();
    std::thread::scope(|scope| {
        for i in 0..4u64 {
            let store = &store;
            scope.spawn(move || {
                store
                    .package(
                        vec![src("w.gguf", llama(i + 1))],
                        &format!("m{i}"),
                        PackageOptions::default(),
                    )
                    .unwrap();
            });
        }
    });
    let mut tags: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .flat_map(|m| m.tags)
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        vec![
            "ai/m0:latest",
            "ai/m1:latest",
            "ai/m2:latest",
            "ai/m3:latest"
        ]
    );
}

#[test]
fn times_parse_as_go_writes_them() {
    assert_eq!(
        vec![
            parse_time("2024-02-29T12:34:56Z"),
            parse_time("2024-02-29T12:34:56.123456789Z"),
            parse_time("2024-02-29T13:34:56.5+01:00"),
            parse_time("garbage"),
        ],
        vec![
            Some(1_709_210_096),
            Some(1_709_210_096),
            Some(1_709_210_096),
            None
        ]
    );
}

#[test]
fn a_dmr_index_with_null_tags_and_short_names_reads() {
    let (_dir, store) = store();
    let model = store
        .package(
            vec![src("w.gguf", llama(1))],
            "x",
            PackageOptions::default(),
        )
        .unwrap();
    let text = serde_json::json!({"models": [{"id": model.id, "tags": ["x"], "files": null}]});
    std::fs::write(store.root().join("models.json"), text.to_string()).unwrap();
    assert_eq!(store.get("ai/x:latest").unwrap().tags, vec!["ai/x:latest"]);
}

//! A real OCI registry (Debian's `docker-registry`) on loopback for the
//! registry tests, optionally behind basic auth, and a TCP relay in front
//! of it that can cut a connection after a number of bytes.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::{free_port, run_with_stdin, wait_for_port, KillOnDrop};

pub struct Registry {
    pub port: u16,
    _dir: tempfile::TempDir,
    _child: KillOnDrop,
}

impl Registry {
    /// Starts a registry; with `login`, only that user and password get in.
    pub fn start(login: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let auth = match login {
            Some((user, password)) => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("htpasswd (apache2-utils) is installed");
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: moat-test\n    path: {}\n",
                    file.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is installed (scripts/deps.sh)");
        let child = KillOnDrop(child);
        wait_for_port(port);
        Registry {
            port,
            _dir: dir,
            _child: child,
        }
    }

    pub fn host(&self) -> String {
        format!("localhost:{}", self.port)
    }
}

/// A relay from `port` to `target`, which closes every connection once
/// `up` bytes (client to registry) or `down` bytes (registry to client)
/// have passed in all; 0 means no limit.
pub struct CuttingRelay {
    _child: KillOnDrop,
}

const RELAY: &str = r#"
import socket, sys, threading
port, target, up, down = map(int, sys.argv[1:5])
moved = {"up": 0, "down": 0}
lock = threading.Lock()
def pump(src, dst, key, limit):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            with lock:
                moved[key] += len(data)
                over = limit and moved[key] > limit
            if over:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(64)
while True:
    c, _ = srv.accept()
    u = socket.create_connection(("127.0.0.1", target))
    threading.Thread(target=pump, args=(c, u, "up", up), daemon=True).start()
    threading.Thread(target=pump, args=(u, c, "down", down), daemon=True).start()
"#;

impl CuttingRelay {
    pub fn start(port: u16, target: u16, up: u64, down: u64) -> CuttingRelay {
        let child = Command::new("python3")
            .args(["-c", RELAY])
            .args([port, target].map(|p| p.to_string()))
            .args([up, down].map(|b| b.to_string()))
            .spawn()
            .unwrap();
        let child = KillOnDrop(child);
        wait_for_port(port);
        CuttingRelay { _child: child }
    }
}

/// A tar archive from raw entries (name, type flag, link target, data),
/// written header by header so that it can hold what no tar tool would
/// write: absolute paths, `..`, device nodes.
/// One raw tar entry: name, type flag, link target, data.
pub type RawEntry<'a> = (&'a str, u8, &'a str, &'a [u8]);

pub fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = len - 1);
            h[at..at + len].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, 0o644);
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, 0);
        h[156] = *kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = run_with_stdin(&mut Command::new("sha256sum"), bytes);
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// Writes a one-layer OCI image layout at `dir` (tag `t`) whose layer is `layer`.
pub fn oci_layout_with_layer(dir: &Path, layer: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let (layer_digest, layer_size) = put(layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "config": {}
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}]
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": "t"}}]
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

//! A real HTTPS server on the host's loopback, standing in for a vendor's
//! API: a test CA (for the daemon's MOAT_EXTRA_CA_CERTS), a leaf for the
//! names it stands in for (mapped to it by MOAT_GATEWAY_HOSTS), and a small
//! Python server, given by the test, that logs what it saw to `seen.log`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{wait_for_port, KillOnDrop};

/// What every stand-in ends with: `H` on the port given, over TLS.
const SERVE_TLS: &str = r#"
import http.server, ssl, sys
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("srv.pem", "srv.key")
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

pub struct Upstream {
    pub dir: tempfile::TempDir,
    pub port: u16,
    _child: KillOnDrop,
}

impl Upstream {
    /// Starts `handler` (Python that imports what it uses and defines the
    /// request handler class `H`) over TLS, with a certificate for `names`.
    pub fn start(handler: &str, names: &[&str]) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=moat test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "srv.key",
                "-out",
                "srv.csr",
                "-subj",
                "/CN=upstream",
            ],
        );
        let alt: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        std::fs::write(
            d.join("ext.cnf"),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
                alt.join(",")
            ),
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "srv.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "srv.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        std::fs::write(d.join("server.py"), format!("{handler}{SERVE_TLS}")).unwrap();
        let port = super::free_port();
        let child = Command::new("python3")
            .args(["server.py", &port.to_string()])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let child = KillOnDrop(child);
        wait_for_port(port);
        Upstream {
            dir,
            port,
            _child: child,
        }
    }

    /// What the server logged, one JSON object per line.
    pub fn seen(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("seen.log")).unwrap_or_default()
    }

    /// The test CA's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl {args:?}");
}

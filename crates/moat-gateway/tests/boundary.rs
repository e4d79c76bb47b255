//! Attacks on the gateway from a sandbox's side, against real upstreams on
//! loopback over real TLS: keys echoed back in every encoding and framing
//! the gateway sees, doors held open without a word, tunnels that outlive
//! a block, a Host named twice, and the host's loopback reached where a
//! dialer should answer instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_gateway::credentials::{Credential, Service, PLACEHOLDER};
use moat_gateway::tls::{CaPem, Leaves};
use moat_gateway::{Action, Gateway, Limits, LoopbackDialer, Policy, Rule};

const KEY: &str = "sk-test-SECRET-4f2a9d";
const TOKEN: &str = "ghp_SeCrEt0123456789";

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The key in every form a test looks for: as is, in lower case (header
/// names), and the bare base64 of basic auth.
fn leaked(bytes: &[u8]) -> Option<String> {
    let basic = b64(&format!("x-access-token:{TOKEN}"));
    [
        KEY.to_string(),
        KEY.to_ascii_lowercase(),
        TOKEN.to_string(),
        basic,
    ]
    .into_iter()
    .find(|form| contains(bytes, form))
}

fn assert_no_key(what: &str, bytes: &[u8]) {
    if let Some(form) = leaked(bytes) {
        panic!(
            "{what}: the key came back as {form:?}:\n{}",
            String::from_utf8_lossy(bytes)
        );
    }
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn compress(kind: &str, data: &[u8]) -> Vec<u8> {
    use flate2::Compression;
    match kind {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "zlib" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        _ => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }
}

fn chunked(data: &[u8], trailers: &str) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n0\r\n");
    out.extend_from_slice(trailers.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// What the HTTP/1.1 upstream answers at `path`, given the credential it
/// received (`seen`) and the request's Accept-Encoding.
fn answer(path: &str, seen: &str, accept: &str) -> Vec<u8> {
    let echo = format!("{{\"seen\": \"{seen}\"}}").into_bytes();
    let plain = |head: &str, body: &[u8]| {
        let mut out = format!(
            "HTTP/1.1 200 OK\r\n{head}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    };
    match path {
        // A well-behaved server: compressed only where the client accepts it.
        "/polite-gzip" if accept.contains("gzip") => {
            plain("Content-Encoding: gzip\r\n", &compress("gzip", &echo))
        }
        "/polite-gzip" => plain("", &echo),
        // Servers that compress whatever was asked.
        "/gzip" => plain("Content-Encoding: gzip\r\n", &compress("gzip", &echo)),
        "/zlib" => plain("Content-Encoding: deflate\r\n", &compress("zlib", &echo)),
        "/raw-deflate" => plain("Content-Encoding: deflate\r\n", &compress("raw", &echo)),
        "/te-gzip" => {
            let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec();
            out.extend_from_slice(&chunked(&compress("gzip", &echo), ""));
            out
        }
        "/br" => plain("Content-Encoding: br\r\n", &echo),
        "/trailers" => {
            let mut out =
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-echo\r\n\r\n"
                    .to_vec();
            out.extend_from_slice(&chunked(b"ok", &format!("x-echo: {seen}\r\n")));
            out
        }
        "/reason" => {
            format!("HTTP/1.1 200 Fine {seen}\r\nContent-Length: 2\r\n\r\nok").into_bytes()
        }
        "/bytes" => {
            let mut out = b"HTTP/1.1 200 OK\r\nX-Echo: \xff".to_vec();
            out.extend_from_slice(seen.as_bytes());
            out.extend_from_slice(b"\xfe\r\n");
            out.extend_from_slice(format!("X-{seen}: 1\r\nContent-Length: 2\r\n\r\nok").as_bytes());
            out
        }
        // Only the base64 of basic auth, without "Basic ".
        "/basic" => plain("", seen.trim_start_matches("Basic ").as_bytes()),
        _ => plain("", &echo),
    }
}

struct Upstreams {
    ca_file: std::path::PathBuf,
    h1: u16,
    h2: u16,
    /// The Accept-Encoding, Range and credential of every request the HTTP/1.1 upstream saw.
    seen: Arc<std::sync::Mutex<Vec<HashMap<String, String>>>>,
}

/// An HTTP/1.1 upstream (raw, so that it can send what hyper would not)
/// and an HTTP/2 one, both over TLS with a CA of their own.
fn upstreams() -> Upstreams {
    let ca = moat_gateway::tls::new_ca("upstream").unwrap();
    let dir = std::env::temp_dir().join(format!("moat-boundary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join(format!("ca-{}.pem", unique()));
    std::fs::write(&ca_file, &ca.cert).unwrap();
    let leaves = Arc::new(Leaves::new(&ca).unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    Upstreams {
        ca_file,
        h1: h1_upstream(Arc::clone(&leaves), Arc::clone(&seen)),
        h2: h2_upstream(leaves),
        seen,
    }
}

fn unique() -> usize {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn h1_upstream(
    leaves: Arc<Leaves>,
    seen: Arc<std::sync::Mutex<Vec<HashMap<String, String>>>>,
) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut config = (*moat_gateway::tls::server_config(&leaves, "echo.test").unwrap()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let config = Arc::clone(&config);
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let headers: HashMap<String, String> = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let credential = headers
                        .get("x-api-key")
                        .or(headers.get("authorization"))
                        .cloned()
                        .unwrap_or_default();
                    let accept = headers.get("accept-encoding").cloned().unwrap_or_default();
                    seen.lock().unwrap().push(headers);
                    if tls
                        .write_all(&answer(&path, &credential, &accept))
                        .and_then(|_| tls.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A body of one data frame and trailers.
struct WithTrailers(Option<bytes::Bytes>, Option<http::HeaderMap>);

impl http_body::Body for WithTrailers {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match this.0.take() {
            Some(data) => Some(http_body::Frame::data(data)),
            None => this.1.take().map(http_body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

/// An HTTP/2 upstream that echoes the credential in a trailer.
fn h2_upstream(leaves: Arc<Leaves>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let config = moat_gateway::tls::server_config(&leaves, "h2echo.test").unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let seen = req
                                .headers()
                                .get("x-api-key")
                                .cloned()
                                .unwrap_or(http::HeaderValue::from_static("none"));
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("x-echo", seen);
                            let body = WithTrailers(Some("ok".into()), Some(trailers));
                            Ok::<_, std::convert::Infallible>(http::Response::new(body))
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
    });
    port
}

struct Setup {
    gateway: Gateway,
    proxy: u16,
    sandbox_ca: CaPem,
    up: Upstreams,
}

fn service(name: &str, host: &str, header: &str, format: &str) -> Service {
    Service {
        name: name.into(),
        env: vec![],
        hosts: vec![host.into()],
        header: header.into(),
        format: format.into(),
    }
}

/// A gateway whose sandbox may reach the stand-ins (and the host's
/// loopback), with a key for echo.test and h2echo.test and a token for
/// basic.test.
fn setup() -> Setup {
    let up = upstreams();
    let gateway = Gateway::new(Arc::new(|_| {}), &[up.ca_file.as_path()]).unwrap();
    let local = "127.0.0.1".parse().unwrap();
    gateway.set_static_names(
        [
            ("echo.test".to_string(), (local, Some(up.h1))),
            ("basic.test".to_string(), (local, Some(up.h1))),
            ("h2echo.test".to_string(), (local, Some(up.h2))),
        ]
        .into_iter()
        .collect(),
    );
    gateway.set_credentials(vec![
        Credential {
            service: service("echo", "echo.test", "x-api-key", "{key}"),
            key: KEY.into(),
        },
        Credential {
            service: service("echo2", "h2echo.test", "x-api-key", "{key}"),
            key: KEY.into(),
        },
        Credential {
            service: service("git", "basic.test", "authorization", "basic:x-access-token"),
            key: TOKEN.into(),
        },
    ]);
    let sandbox_ca = moat_gateway::tls::new_ca("sandbox").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = l.local_addr().unwrap().port();
    gateway
        .attach("id", "demo", policy(), Some(&sandbox_ca), l)
        .unwrap();
    Setup {
        gateway,
        proxy,
        sandbox_ca,
        up,
    }
}

fn policy() -> Policy {
    let mut p = Policy::preset("deny-all").unwrap();
    for host in ["echo.test", "basic.test", "h2echo.test", "localhost"] {
        p.add(Rule::host(Action::Allow, host).unwrap());
    }
    p
}

fn connect(proxy: u16, target: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(tcp, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

fn client_config(ca: &CaPem, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.cert.as_bytes()).flatten() {
        roots.add(c).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection through the gateway to `host`, as a sandbox's client makes it.
fn tls_to(s: &Setup, host: &str) -> Tls {
    let tcp = connect(s.proxy, &format!("{host}:443"));
    let conn = rustls::ClientConnection::new(
        client_config(&s.sandbox_ca, &[b"http/1.1"]),
        host.to_string().try_into().unwrap(),
    )
    .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Everything until the connection ends (a missing close_notify is no error here).
fn read_all(r: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The body of a raw HTTP/1.1 response, de-chunked where it is chunked.
fn body_of(raw: &[u8]) -> Vec<u8> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let mut rest = &raw[end..];
    if !head.contains("transfer-encoding: chunked") {
        return rest.to_vec();
    }
    let mut out = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = std::str::from_utf8(&rest[..eol]).unwrap().trim();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
        rest = &rest[eol + 2 + size + 2..];
    }
}

/// One HTTP/1.1 request over intercepted TLS; the raw bytes that came back.
fn h1_get(s: &Setup, host: &str, path: &str, extra: &str) -> Vec<u8> {
    let mut tls = tls_to(s, host);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nx-api-key: {PLACEHOLDER}\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    read_all(&mut tls)
}

#[test]
fn compressed_echoes_of_the_key_never_reach_the_sandbox() {
    let s = setup();
    // curl --compressed: the sandbox asks for gzip; the gateway asks for none.
    let raw = h1_get(
        &s,
        "echo.test",
        "/polite-gzip",
        "Accept-Encoding: gzip, deflate, br\r\nRange: bytes=0-5\r\n",
    );
    assert_no_key("polite gzip", &raw);
    assert_eq!(
        String::from_utf8_lossy(&body_of(&raw)),
        format!("{{\"seen\": \"{PLACEHOLDER}\"}}")
    );
    let seen = s.up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        seen.get("accept-encoding").map(String::as_str),
        Some("identity")
    );
    assert_eq!(seen.get("range"), None, "a range could split the echo");
    assert_eq!(seen.get("x-api-key").map(String::as_str), Some(KEY));

    // Servers that compress all the same are inflated, masked, sent on plain.
    for path in ["/gzip", "/zlib", "/raw-deflate", "/te-gzip"] {
        let raw = h1_get(&s, "echo.test", path, "Accept-Encoding: gzip, deflate\r\n");
        assert_no_key(path, &raw);
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{path}: {text}");
        assert!(!text.contains("content-encoding"), "{path}: {text}");
        assert_eq!(
            String::from_utf8_lossy(&body_of(&raw)),
            format!("{{\"seen\": \"{PLACEHOLDER}\"}}"),
            "{path}: {text}"
        );
    }
    // What the gateway cannot read it does not pass on.
    let raw = h1_get(&s, "echo.test", "/br", "Accept-Encoding: br\r\n");
    assert_no_key("br", &raw);
    assert!(
        raw.starts_with(b"HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn trailers_reason_phrases_and_raw_header_bytes_are_masked() {
    let s = setup();
    // An HTTP/1.1 client that takes trailers (HTTP/2's are below).
    let raw = h1_get(&s, "echo.test", "/trailers", "TE: trailers\r\n");
    assert_no_key("trailers", &raw);
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    let raw = h1_get(&s, "echo.test", "/reason", "");
    assert_no_key("reason phrase", &raw);
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    // A value that is not UTF-8, and a header named after the key.
    let raw = h1_get(&s, "echo.test", "/bytes", "");
    assert_no_key("raw header bytes", &raw);
    assert!(
        raw.windows(2 + PLACEHOLDER.len())
            .any(|w| w[0] == 0xff && &w[1..=PLACEHOLDER.len()] == PLACEHOLDER.as_bytes()),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn the_bare_base64_of_basic_auth_is_masked() {
    let s = setup();
    let raw = h1_get(&s, "basic.test", "/basic", "");
    assert_no_key("bare base64", &raw);
    assert_eq!(body_of(&raw), PLACEHOLDER.as_bytes());
    let raw = h1_get(&s, "basic.test", "/echo", "");
    assert_no_key("basic header", &raw);
}

/// One request over HTTP/2 through an intercepted tunnel: status, headers, body and trailers.
async fn h2_get(
    s: &Setup,
    host: &str,
    path: &str,
) -> (http::response::Parts, bytes::Bytes, Option<http::HeaderMap>) {
    use http_body_util::BodyExt;
    let tcp = tokio::task::spawn_blocking({
        let (proxy, target) = (s.proxy, format!("{host}:443"));
        move || connect(proxy, &target)
    })
    .await
    .unwrap();
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(&s.sandbox_ca, &[b"h2"]));
    let tls = connector
        .connect(host.to_string().try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://{host}{path}"))
        .header("x-api-key", PLACEHOLDER)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (parts, collected.to_bytes(), trailers)
}

fn dump(parts: &http::response::Parts, body: &[u8], trailers: &Option<http::HeaderMap>) -> Vec<u8> {
    let mut out = format!("{}\n", parts.status).into_bytes();
    for map in std::iter::once(&parts.headers).chain(trailers.iter()) {
        for (k, v) in map {
            out.extend_from_slice(k.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.push(b'\n');
        }
    }
    out.extend_from_slice(body);
    out
}

#[test]
fn trailers_over_http2_are_masked_from_either_upstream() {
    let s = setup();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (host, path) in [("echo.test", "/trailers"), ("h2echo.test", "/")] {
        let (parts, body, trailers) = rt.block_on(h2_get(&s, host, path));
        let all = dump(&parts, &body, &trailers);
        assert_no_key(host, &all);
        assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&all));
        assert_eq!(
            trailers
                .as_ref()
                .and_then(|t| t.get("x-echo"))
                .map(|v| v.as_bytes()),
            Some(PLACEHOLDER.as_bytes()),
            "{host}: {}",
            String::from_utf8_lossy(&all)
        );
    }
}

fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    f(&mut l);
    l
}

/// How long until the gateway closes `c` (reads until EOF or a reset).
fn closed_after(c: &mut impl Read) -> Duration {
    let t = Instant::now();
    let _ = read_all(c);
    t.elapsed()
}

fn assert_closed_between(what: &str, took: Duration, low: f64, high: f64) {
    let t = took.as_secs_f64();
    assert!(
        (low..high).contains(&t),
        "{what}: closed after {t:.1} s, not within [{low}, {high})"
    );
}

#[test]
fn every_wait_inside_an_intercepted_tunnel_times_out() {
    let s = setup();
    s.gateway.set_limits(limits(|l| {
        l.header_timeout = Duration::from_millis(1500);
        l.idle_timeout = Duration::from_millis(2500);
        l.tls_handshake_timeout = Duration::from_secs(1);
    }));
    // A TLS record header, then nothing: the handshake times out.
    let mut c = connect(s.proxy, "echo.test:443");
    c.write_all(&[0x16, 0x03, 0x01]).unwrap();
    assert_closed_between("stalled handshake", closed_after(&mut c), 0.8, 4.0);

    // The handshake, then no request, or half a head: the head timeout.
    let mut tls = tls_to(&s, "echo.test");
    tls.conn.complete_io(&mut tls.sock).unwrap();
    assert_closed_between("silent after TLS", closed_after(&mut tls), 1.2, 4.0);
    let mut tls = tls_to(&s, "echo.test");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: echo.test\r\n")
        .unwrap();
    assert_closed_between("half a head inside TLS", closed_after(&mut tls), 1.2, 4.0);

    // One request on a keep-alive connection, then nothing: the idle timeout.
    let mut tls = tls_to(&s, "echo.test");
    tls.write_all(b"GET /echo HTTP/1.1\r\nHost: echo.test\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&got, "\"}") {
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_closed_between(
        "idle keep-alive inside TLS",
        closed_after(&mut tls),
        1.2,
        5.0,
    );

    // HTTP/2 has no head timeout of its own: a preface and then nothing.
    let tcp = connect(s.proxy, "echo.test:443");
    let conn = rustls::ClientConnection::new(
        client_config(&s.sandbox_ca, &[b"h2"]),
        "echo.test".try_into().unwrap(),
    )
    .unwrap();
    let mut h2 = rustls::StreamOwned::new(conn, tcp);
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    assert_closed_between("silent HTTP/2", closed_after(&mut h2), 1.2, 4.0);
}

/// A plain upstream that never says anything and reads everything.
fn silent_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = read_all(&mut c);
            });
        }
    });
    port
}

#[test]
fn idle_tunnels_and_keep_alive_connections_are_closed() {
    let s = setup();
    s.gateway.set_limits(limits(|l| {
        l.header_timeout = Duration::from_secs(1);
        l.idle_timeout = Duration::from_millis(1500);
        l.tunnel_idle_timeout = Duration::from_secs(3);
    }));
    let port = silent_upstream();
    let target = format!("localhost:{port}");
    // Nothing either way (the head timeout), or one byte that is not TLS
    // and then nothing (the tunnel's idle timeout).
    let mut c = connect(s.proxy, &target);
    assert_closed_between("silent tunnel", closed_after(&mut c), 0.8, 2.8);
    let mut c = connect(s.proxy, &target);
    c.write_all(b"x").unwrap();
    assert_closed_between("one-byte tunnel", closed_after(&mut c), 2.8, 6.0);
    // A tunnel that carries something now and then stays open.
    let mut c = connect(s.proxy, &target);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(400));
        c.write_all(b"ping").unwrap();
    }
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(c.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a busy tunnel was closed"
    );

    // Plain HTTP: a keep-alive connection after its request.
    let mut c = TcpStream::connect(("127.0.0.1", s.proxy)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET http://localhost:{}/ HTTP/1.1\r\nHost: localhost:{}\r\n\r\n",
        s.up.h1, s.up.h1
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    assert!(c.read(&mut buf).unwrap() > 0);
    assert_closed_between("idle keep-alive", closed_after(&mut c), 0.8, 4.0);
}

#[test]
fn a_flooding_sandbox_is_capped_and_the_others_are_served() {
    let s = setup();
    s.gateway.set_limits(limits(|l| l.max_connections = 20));
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    s.gateway
        .attach("id2", "other", policy(), None, other)
        .unwrap();
    // Twenty silent connections fill the first sandbox's cap.
    let held: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", s.proxy)).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.gateway.open_connections("id") < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.gateway.open_connections("id"), 20);
    // The next ones are closed at once, not held.
    for _ in 0..50 {
        let mut c = TcpStream::connect(("127.0.0.1", s.proxy)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(b"GET http://localhost:1/ HTTP/1.1\r\n\r\n");
        assert!(closed_after(&mut c) < Duration::from_secs(1));
    }
    assert_eq!(s.gateway.open_connections("id"), 20);
    // The other sandbox is served meanwhile.
    let mut c = TcpStream::connect(("127.0.0.1", other_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        c,
        "GET http://localhost:{}/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        silent_free_port()
    )
    .unwrap();
    let out = read_all(&mut c);
    assert!(
        out.starts_with(b"HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // Once the flood ends, the first sandbox is served again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.gateway.open_connections("id") > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = TcpStream::connect(("127.0.0.1", s.proxy)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        c,
        "GET http://localhost:{}/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        silent_free_port()
    )
    .unwrap();
    let out = read_all(&mut c);
    assert!(
        out.starts_with(b"HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

/// A loopback port nothing listens on.
fn silent_free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain upstream that answers each line with the same line.
fn line_echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn a_block_reaches_tunnels_that_are_already_open() {
    let s = setup();
    let port = line_echo();
    // A tunnel that is not intercepted (no TLS) carries data...
    let mut c = connect(s.proxy, &format!("localhost:{port}"));
    c.write_all(b"one\n").unwrap();
    let mut buf = [0u8; 16];
    let n = c.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"one\n");
    // ...and an intercepted one serves a first request on a kept connection.
    let mut tls = tls_to(&s, "echo.test");
    tls.write_all(b"GET /echo HTTP/1.1\r\nHost: echo.test\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !contains(&got, "\"}") {
        let n = tls.read(&mut chunk).unwrap();
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));

    let mut blocked = policy();
    blocked.add(Rule::host(Action::Block, "localhost").unwrap());
    blocked.add(Rule::host(Action::Block, "echo.test").unwrap());
    s.gateway.set_policy("id", blocked);
    // The plain tunnel closes at once.
    assert!(closed_after(&mut c) < Duration::from_secs(2));
    // The next request in the intercepted tunnel is refused.
    tls.write_all(b"GET /echo HTTP/1.1\r\nHost: echo.test\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    while !contains(&got, "\r\n\r\n") {
        let n = tls.read(&mut chunk).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // Detaching a sandbox ends its tunnels too.
    s.gateway.set_policy("id", policy());
    let mut c = connect(s.proxy, &format!("localhost:{port}"));
    c.write_all(b"two\n").unwrap();
    let n = c.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"two\n");
    s.gateway.detach("id");
    assert!(closed_after(&mut c) < Duration::from_secs(2));
}

#[test]
fn a_host_named_twice_or_apart_from_the_target_is_refused() {
    let s = setup();
    let h1 = s.up.h1;
    let send = |raw: String| {
        let mut c = TcpStream::connect(("127.0.0.1", s.proxy)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(raw.as_bytes()).unwrap();
        String::from_utf8_lossy(&read_all(&mut c)).to_string()
    };
    let resp = send(format!("GET http://localhost:{h1}/ HTTP/1.1\r\nHost: localhost:{h1}\r\nHost: evil.example\r\nConnection: close\r\n\r\n"));
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let resp = send(format!(
        "CONNECT localhost:{h1} HTTP/1.1\r\nHost: evil.example:{h1}\r\nConnection: close\r\n\r\n"
    ));
    assert!(resp.starts_with("HTTP/1.1 421"), "{resp}");
    let resp = send(format!(
        "CONNECT localhost:{h1} HTTP/1.1\r\nHost: localhost:{h1}\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    ));
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // Inside an intercepted tunnel.
    let raw = h1_get(&s, "echo.test", "/echo", "Host: evil.example\r\n");
    assert!(
        raw.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

/// A plain server that answers every request with `who`.
fn named_server(who: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{who}",
                    who.len()
                );
            });
        }
    });
    port
}

#[test]
fn a_loopback_port_with_a_dialer_is_served_by_the_dialer() {
    let host_side = named_server("host scope");
    let sandbox_side = named_server("sandbox scope");
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let dialer: LoopbackDialer = Arc::new(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        TcpStream::connect(("127.0.0.1", sandbox_side))
    });
    let gateway = Gateway::new(Arc::new(|_| {}), &[]).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = l.local_addr().unwrap().port();
    let mut only_other = Policy::preset("deny-all").unwrap();
    only_other.add(Rule::host(Action::Allow, &format!("localhost:{sandbox_side}")).unwrap());
    gateway
        .attach_with(
            "id",
            "demo",
            only_other,
            None,
            l,
            [(host_side, dialer)].into_iter().collect(),
        )
        .unwrap();
    let get = |host: &str, port: u16| {
        let mut c = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            c,
            "GET http://{host}:{port}/ HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        String::from_utf8_lossy(&read_all(&mut c)).to_string()
    };
    // The policy decides first: not allowed, not dialled.
    let resp = get("localhost", host_side);
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Allowed: every spelling of the host's loopback on that port reaches the dialer.
    let mut p = Policy::preset("deny-all").unwrap();
    p.add(Rule::host(Action::Allow, "localhost").unwrap());
    p.add(Rule::cidr(Action::Allow, "127.0.0.0/8").unwrap());
    gateway.set_policy("id", p);
    for host in [
        "localhost",
        "host.docker.internal",
        "127.0.0.1",
        "2130706433",
    ] {
        let resp = get(host, host_side);
        assert!(resp.ends_with("\r\n\r\nsandbox scope"), "{host}: {resp}");
    }
    let mut c = connect(proxy, &format!("localhost:{host_side}"));
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let out = String::from_utf8_lossy(&read_all(&mut c)).to_string();
    assert!(out.ends_with("sandbox scope"), "{out}");
    // Other ports of the loopback are dialled as before.
    let resp = get("localhost", sandbox_side);
    assert!(resp.ends_with("sandbox scope"), "{resp}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 5);
}

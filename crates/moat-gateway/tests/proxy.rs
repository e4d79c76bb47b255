//! The proxy against real servers on loopback, with the policy deciding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_gateway::{Action, Gateway, LogEntry, Policy, Rule};

/// A tiny HTTP/1.1 server that answers every request with its own request line, keeping connections alive.
/// A loopback listener with a backlog deep enough for a thousand connections at once
/// (std's `bind` listens with 128).
fn listener() -> TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor we own and hand to TcpListener.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        assert_eq!(
            libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&addr) as u32
            ),
            0
        );
        assert_eq!(libc::listen(fd, 4096), 0);
        TcpListener::from_raw_fd(fd)
    }
}

fn upstream() -> u16 {
    let l = listener();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let first = head.lines().next().unwrap_or("").to_string();
                    let host = head
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("host:"))
                        .unwrap_or("")
                        .to_string();
                    let body = format!("{first}\n{host}\n");
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
    });
    port
}

struct Setup {
    gateway: Gateway,
    proxy: u16,
    log: Arc<Mutex<Vec<LogEntry>>>,
}

fn setup(policy: Policy) -> Setup {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink_log = Arc::clone(&log);
    let gateway = Gateway::new(Arc::new(move |e| sink_log.lock().unwrap().push(e)), &[]).unwrap();
    let l = listener();
    let proxy = l.local_addr().unwrap().port();
    gateway.attach("id1", "demo", policy, None, l).unwrap();
    Setup {
        gateway,
        proxy,
        log,
    }
}

fn send(proxy: u16, raw: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn allow_localhost() -> Policy {
    let mut p = Policy::preset("deny-all").unwrap();
    p.add(Rule::host(Action::Allow, "localhost").unwrap());
    p
}

#[test]
fn allowed_requests_reach_the_upstream_with_origin_form_and_are_logged() {
    let port = upstream();
    let s = setup(allow_localhost());
    let resp = send(s.proxy, &format!("GET http://localhost:{port}/a?b=1 HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("GET /a?b=1 HTTP/1.1\nhost: localhost:"),
        "{resp}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let log = s.log.lock().unwrap().clone();
    assert_eq!(log.len(), 1);
    let e = &log[0];
    assert_eq!(
        (
            e.sandbox.as_str(),
            e.method.as_str(),
            e.host.as_str(),
            e.port,
            e.path.as_deref(),
            e.rule.as_str(),
            e.decision.as_str(),
            e.status
        ),
        (
            "demo",
            "GET",
            "localhost",
            port,
            Some("/a"),
            "allow-host localhost",
            "allowed",
            200
        )
    );
    assert!(e.bytes_down > 0);
}

#[test]
fn every_spelling_of_loopback_is_refused_without_a_rule_naming_it() {
    let port = upstream();
    let s = setup(Policy::preset("allow-all").unwrap());
    for host in [
        "127.0.0.1",
        "2130706433",
        "0x7f.1",
        "127.1",
        "[::ffff:127.0.0.1]",
        "localhost",
        "host.docker.internal",
        "[::1]",
        "0177.0.0.1",
    ] {
        let resp = send(
            s.proxy,
            &format!("GET http://{host}:{port}/ HTTP/1.1\r\nConnection: close\r\n\r\n"),
        );
        assert!(resp.starts_with("HTTP/1.1 403"), "{host}: {resp}");
        assert!(
            resp.contains("blocked for sandbox demo by rule <blocked range: loopback>")
                && resp.contains("--allow-host"),
            "{host}: {resp}"
        );
    }
    let resp = send(
        s.proxy,
        &format!("CONNECT 2130706433:{port} HTTP/1.1\r\nConnection: close\r\n\r\n"),
    );
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
}

#[test]
fn connect_tunnels_and_policy_changes_apply_to_the_next_request() {
    let port = upstream();
    let s = setup(allow_localhost());
    let mut c = TcpStream::connect(("127.0.0.1", s.proxy)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    write!(c, "GET /through HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // The answer may come in pieces: read until it is all there.
    let mut got = String::new();
    while !got.contains("GET /through") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "the tunnel closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }

    s.gateway
        .set_policy("id1", Policy::preset("deny-all").unwrap());
    let resp = send(
        s.proxy,
        &format!("GET http://localhost:{port}/ HTTP/1.1\r\nConnection: close\r\n\r\n"),
    );
    assert!(
        resp.starts_with("HTTP/1.1 403") && resp.contains("<default policy>"),
        "{resp}"
    );
}

/// An upstream that reads until the client's EOF, then answers with how
/// many bytes it got and `extra` more, and closes.
fn counting_upstream(extra: usize) -> u16 {
    let l = listener();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut got = Vec::new();
                conn.read_to_end(&mut got).unwrap();
                let mut answer = format!("{}\n", got.len()).into_bytes();
                answer.resize(answer.len() + extra, b'x');
                conn.write_all(&answer).unwrap();
            });
        }
    });
    port
}

#[test]
fn tunnels_pass_half_closes_on_and_log_the_bytes_each_way() {
    let port = counting_upstream(300_000);
    let s = setup(allow_localhost());
    let mut c = TcpStream::connect(("127.0.0.1", s.proxy)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Bytes right behind the head: some reach the gateway with it.
    let mut out =
        format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n").into_bytes();
    out.resize(out.len() + 1_000_000, b'u');
    c.write_all(&out).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    let end = back.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(back.starts_with(b"HTTP/1.1 200"));
    let answer = &back[end..];
    assert!(
        answer.starts_with(b"1000000\n"),
        "{:?}",
        &answer[..16.min(answer.len())]
    );
    assert_eq!(answer.len(), 8 + 300_000);
    // The log row is written once both directions have ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let entry = loop {
        let found = s
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.method == "CONNECT")
            .cloned();
        match found {
            Some(e) => break e,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            None => panic!("no log row for the tunnel"),
        }
    };
    assert_eq!(
        (entry.status, entry.bytes_up, entry.bytes_down),
        (200, 1_000_000, 8 + 300_000)
    );
}

#[test]
fn bad_requests_get_4xx_and_unreachable_upstreams_502() {
    let s = setup(allow_localhost());
    assert!(send(
        s.proxy,
        "GET /relative HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .starts_with("HTTP/1.1 400"));
    assert!(send(s.proxy, "NONSENSE\r\n\r\n").starts_with("HTTP/1.1 400"));
    let huge = format!(
        "GET http://localhost:1/ HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(1_000_000)
    );
    let resp = send(s.proxy, &huge);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let resp = send(
        s.proxy,
        &format!("GET http://localhost:{closed}/ HTTP/1.1\r\nConnection: close\r\n\r\n"),
    );
    assert!(
        resp.starts_with("HTTP/1.1 502")
            && resp.contains(&format!("cannot reach localhost:{closed}")),
        "{resp}"
    );
    let port = upstream();
    let resp = send(s.proxy, &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"));
    assert!(resp.starts_with("HTTP/1.1 421"), "{resp}");
}

/// Raise this process's descriptor limit to its hard limit: the test holds
/// thousands of sockets (clients, the proxy's two sides, the upstream's).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
fn a_thousand_concurrent_connections_are_served() {
    raise_fd_limit();
    let port = upstream();
    let s = setup(allow_localhost());
    // Above the per-sandbox cap's default: this measures the gateway, not the cap.
    s.gateway.set_limits(moat_gateway::Limits {
        max_connections: 2000,
        ..Default::default()
    });
    let barrier = Arc::new(std::sync::Barrier::new(1000));
    let handles: Vec<_> = (0..1000)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            let proxy = s.proxy;
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                // All connections open at once, then each sends its request.
                barrier.wait();
                write!(c, "GET http://localhost:{port}/n{i} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n").unwrap();
                let mut out = String::new();
                c.read_to_string(&mut out).unwrap();
                out.starts_with("HTTP/1.1 200") && out.contains(&format!("GET /n{i} "))
            })
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(ok, 1000);
}

#[test]
fn clients_that_hang_up_at_any_point_do_not_hurt_the_gateway() {
    let port = upstream();
    let s = setup(allow_localhost());
    let request = format!("GET http://localhost:{port}/whole HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Length: 10\r\n\r\n0123456789");
    let connect = format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n\x16\x03\x01\x02\x00\x01");
    for raw in [&request, &connect] {
        for cut in 0..raw.len() {
            let mut c = TcpStream::connect(("127.0.0.1", s.proxy)).unwrap();
            let _ = c.write_all(&raw.as_bytes()[..cut]);
            drop(c);
        }
    }
    let resp = send(
        s.proxy,
        &format!("GET http://localhost:{port}/after HTTP/1.1\r\nConnection: close\r\n\r\n"),
    );
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("GET /after"),
        "{resp}"
    );
}

/// An HTTPS server that speaks HTTP/2 (by ALPN) and answers with the version it saw.
fn h2_upstream(leaves: Arc<moat_gateway::tls::Leaves>) -> u16 {
    let l = listener();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let config = moat_gateway::tls::server_config(&leaves, "h2.test").unwrap();
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
                            let body =
                                format!("version={:?} path={}", req.version(), req.uri().path());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
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

#[test]
fn intercepted_requests_go_upstream_over_http2_where_the_server_offers_it() {
    let upstream_ca = moat_gateway::tls::new_ca("upstream").unwrap();
    let port = h2_upstream(Arc::new(
        moat_gateway::tls::Leaves::new(&upstream_ca).unwrap(),
    ));
    let dir = std::env::temp_dir().join(format!("moat-h2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, &upstream_ca.cert).unwrap();

    let gateway = Gateway::new(Arc::new(|_| {}), &[ca_file.as_path()]).unwrap();
    gateway.set_static_names(
        [(
            "h2.test".to_string(),
            ("127.0.0.1".parse().unwrap(), Some(port)),
        )]
        .into_iter()
        .collect(),
    );
    let sandbox_ca = moat_gateway::tls::new_ca("sandbox").unwrap();
    let mut policy = Policy::preset("deny-all").unwrap();
    policy.add(Rule::host(Action::Allow, "h2.test").unwrap());
    let l = listener();
    let proxy = l.local_addr().unwrap().port();
    gateway
        .attach("id", "demo", policy, Some(&sandbox_ca), l)
        .unwrap();

    let mut tcp = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"CONNECT h2.test:443 HTTP/1.1\r\nHost: h2.test:443\r\n\r\n")
        .unwrap();
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
    // The client trusts only the sandbox's CA, as inside a sandbox.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut sandbox_ca.cert.as_bytes()).flatten() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "h2.test".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /hello HTTP/1.1\r\nHost: h2.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("version=HTTP/2.0 path=/hello"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}

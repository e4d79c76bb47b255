//! The door under attack: slow heads and bodies, idle connections, a flood
//! over the cap, and running out of descriptors; and what must still work
//! meanwhile (long answers, other doors).

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::api::http;

/// A handler with a few routes shaped like the runner's: quick, slow to
/// answer, streaming with pauses, and reading a body.
fn handler() -> Handler {
    Arc::new(|_scope, req: hyper::Request<Incoming>| -> Answer {
        Box::pin(async move {
            match req.uri().path() {
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    http::text(hyper::StatusCode::OK, "slow\n")
                }
                "/stream" => {
                    let (tx, resp) = http::streaming("text/plain");
                    tokio::spawn(async move {
                        for i in 0..6 {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            if tx.send(Bytes::from(format!("piece {i}\n"))).await.is_err() {
                                return;
                            }
                        }
                    });
                    resp
                }
                "/body" => match http::read_body(req.into_body()).await {
                    Ok(b) => http::text(hyper::StatusCode::OK, b),
                    Err(e) => e.response(http::Dialect::Plain),
                },
                _ => http::text(hyper::StatusCode::OK, "ok\n"),
            }
        })
    })
}

fn limits(header_ms: u64, idle_ms: u64, cap: usize) -> Limits {
    Limits {
        header_timeout: Duration::from_millis(header_ms),
        idle_timeout: Duration::from_millis(idle_ms),
        max_connections: cap,
        ..Limits::default()
    }
}

/// A door on a loopback port; it stops when the sender is dropped.
async fn door(scope: Scope, limits: &Limits) -> (u16, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(accept_loop(
        listener,
        Door::new("test", scope, limits),
        handler(),
        stopped,
    ));
    (port, stop)
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

/// Read one response (its head, and a body of content-length or chunked).
async fn response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.trim().parse::<usize>().ok());
            match len {
                Some(n) if body.len() >= n => return text,
                None if body.ends_with("0\r\n\r\n") => return text,
                _ => {}
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// Whether the server closes `s` within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_a_byte_at_a_time_is_cut_at_the_header_timeout() {
    let (port, _stop) = door(Scope::Sandbox, &limits(400, 60_000, 64)).await;
    let mut s = connect(port).await;
    let started = Instant::now();
    s.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(3) {
        // Still sending: the idle clock never runs out, the head's does.
        if s.write_all(b"X").await.is_err()
            || closed_within(&mut s, Duration::from_millis(100)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a head still unfinished after 3 s was not cut");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_is_cut_at_the_header_timeout() {
    let (port, _stop) = door(Scope::Sandbox, &limits(300, 60_000, 64)).await;
    let mut s = connect(port).await;
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_a_byte_at_a_time_gets_408() {
    let (port, _stop) = door(Scope::Sandbox, &limits(400, 60_000, 64)).await;
    let mut s = connect(port).await;
    s.write_all(b"POST /body HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..15 {
            if s.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s
    });
    let mut s = writer.await.unwrap();
    let answer = response(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_but_long_answers_are_not() {
    let (port, _stop) = door(Scope::Sandbox, &limits(10_000, 500, 64)).await;
    // Idle after an answer: closed at the idle timeout.
    let mut s = connect(port).await;
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(response(&mut s).await.starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // An answer that takes three idle timeouts to come is not cut.
    let mut s = connect(port).await;
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(response(&mut s).await.starts_with("HTTP/1.1 200"));
    // Nor is a stream that lasts longer than one in all.
    let mut s = connect(port).await;
    s.write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = response(&mut s).await;
    assert!(answer.contains("piece 5"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_over_its_cap_is_refused_at_once_and_others_are_served() {
    let cap = limits(60_000, 60_000, 3);
    let (sandbox, _stop) = door(Scope::Sandbox, &cap).await;
    let (host, _stop_host) = door(Scope::Host, &cap).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect(sandbox).await;
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(response(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // The fourth is closed without an answer, at once.
    let mut over = connect(sandbox).await;
    let _ = over
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    assert!(closed_within(&mut over, Duration::from_millis(500)).await);
    // The host's door has no cap, and is served meanwhile.
    for _ in 0..5 {
        let mut s = connect(host).await;
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(response(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // A connection that ends makes room.
    drop(held.remove(0));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = connect(sandbox).await;
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(response(&mut s).await.starts_with("HTTP/1.1 200"));
}

/// CPU seconds this process has used.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_sleeps_instead_of_spinning() {
    // Lowering the descriptor limit would starve other tests sharing the
    // process; nextest gives each test a process of its own.
    if std::env::var_os("NEXTEST_RUN_ID").is_none() {
        eprintln!("skipped: needs a process of its own (run under cargo nextest)");
        return;
    }
    let (port, _stop) = door(Scope::Host, &limits(60_000, 60_000, 0)).await;
    // A client socket made while there are descriptors, connected once
    // there are none: its connection waits in the backlog, and every
    // accept of it fails with EMFILE.
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let client = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let limit = libc::rlimit {
        rlim_cur: open + 16,
        rlim_max: open + 16,
    };
    // SAFETY: setrlimit reads the struct it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let mut filler = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        filler.push(f);
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect(2) with a sockaddr_in of the right size.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_seconds() - before;
    assert!(
        used < 0.3,
        "the accept loop spun: {used:.2} CPU seconds in 1 s"
    );
    // Room again: the waiting connection is served.
    drop(filler);
    client.set_nonblocking(true).unwrap();
    let mut s = TcpStream::from_std(client).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(response(&mut s).await.starts_with("HTTP/1.1 200"));
}

#[test]
fn backoff_grows_only_for_a_lack_of_descriptors() {
    let mut b = Backoff::default();
    let emfile = io::Error::from_raw_os_error(libc::EMFILE);
    let first = b.after(&emfile);
    let second = b.after(&emfile);
    assert!(first >= Duration::from_millis(10) && second > first);
    for _ in 0..20 {
        b.after(&emfile);
    }
    assert_eq!(b.after(&emfile), Backoff::MOST);
    b.reset();
    assert_eq!(b.after(&emfile), Backoff::FIRST);
    let reset = io::Error::from_raw_os_error(libc::ECONNABORTED);
    assert!(b.after(&reset) < Backoff::FIRST);
}

#[test]
fn in_flight_answers_expire_only_when_the_client_stops_reading() {
    let l = limits(1000, 2000, 0);
    let at = |now, last_io, head_since, blocked, in_flight| State {
        now,
        last_io,
        head_since,
        write_blocked_since: blocked,
        in_flight,
    };
    // Waiting for a request: the head's clock and the idle clock.
    assert!(!at(900, 0, 0, NONE, 0).expired(&l));
    assert!(at(1000, 900, 0, NONE, 0).expired(&l));
    assert!(!at(1900, 0, NONE, NONE, 0).expired(&l));
    assert!(at(2000, 0, NONE, NONE, 0).expired(&l));
    // In flight: silent for long is fine, a blocked write is not.
    assert!(!at(100_000, 0, NONE, NONE, 1).expired(&l));
    assert!(!at(100_000, 0, NONE, 99_000, 1).expired(&l));
    assert!(at(100_000, 0, NONE, 98_000, 1).expired(&l));
}

#[test]
fn refusals_are_logged_once_a_period_with_their_count() {
    let log = RateLimitedLog::new(Duration::from_secs(60));
    assert_eq!(log.note(), Some(1));
    for _ in 0..100 {
        assert_eq!(log.note(), None);
    }
    let log = RateLimitedLog::new(Duration::ZERO);
    assert_eq!(log.note(), Some(1));
    assert_eq!(log.note(), Some(1));
}

//! A sandbox that uses up the process's descriptors through its door: the
//! gateway's accept loop must rest rather than spin on EMFILE, and serve
//! again once descriptors are free. A binary of its own: the test lowers
//! the whole process's descriptor limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use moat_gateway::{Action, Gateway, Limits, Policy, Rule};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn set_fd_limit(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

#[test]
fn out_of_descriptors_the_accept_loop_rests_and_recovers() {
    let gateway = Gateway::new(Arc::new(|_| {}), &[]).unwrap();
    gateway.set_limits(Limits {
        max_connections: 100_000,
        ..Default::default()
    });
    let mut policy = Policy::preset("deny-all").unwrap();
    policy.add(Rule::host(Action::Allow, "localhost").unwrap());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = l.local_addr().unwrap().port();
    gateway.attach("id", "demo", policy, None, l).unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A warm-up request, so that the runtime has made what it makes lazily.
    let request = format!("GET http://localhost:{closed}/ HTTP/1.1\r\nConnection: close\r\n\r\n");
    let served = |c: &mut TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out.starts_with("HTTP/1.1 502")
    };
    assert!(served(
        &mut TcpStream::connect(("127.0.0.1", proxy)).unwrap()
    ));

    // Clients take descriptors until none is left; the last connections
    // wait in the door's backlog, which the gateway cannot accept from.
    set_fd_limit(open_descriptors() + 40);
    let mut clients = Vec::new();
    while let Ok(c) = TcpStream::connect(("127.0.0.1", proxy)) {
        clients.push(c);
        assert!(clients.len() < 1000, "the descriptor limit did not hold");
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_seconds() - before;
    assert!(
        spent < 0.3,
        "the gateway spun on EMFILE: {spent:.2} s of CPU in 1 s"
    );

    // Descriptors free again: the waiting connections and new ones are served.
    set_fd_limit(100_000);
    let mut last = clients.pop().unwrap();
    drop(clients);
    assert!(served(&mut last));
    assert!(served(
        &mut TcpStream::connect(("127.0.0.1", proxy)).unwrap()
    ));
}

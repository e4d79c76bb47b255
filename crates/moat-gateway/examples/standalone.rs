//! The gateway on a host port, outside any sandbox, for benchmarks against
//! other proxies: `standalone ADDR [PRESET] [ALLOW-HOST...]`. With
//! `MOAT_BENCH_CA_OUT=FILE` it intercepts TLS with a CA whose certificate it
//! writes there; `MOAT_EXTRA_CA_CERTS=FILE` is the upstream's CA.

use std::sync::Arc;

use moat_gateway::{Action, Gateway, Policy, Rule};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).map(String::as_str).unwrap_or("127.0.0.1:3130");
    let mut policy = Policy::preset(args.get(2).map(String::as_str).unwrap_or("deny-all"))?;
    for host in args.iter().skip(3) {
        policy.add(Rule::host(Action::Allow, host)?);
    }
    // Count requests instead of storing them: the benchmark measures the proxy.
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sink_count = Arc::clone(&count);
    let extra: Vec<std::path::PathBuf> = std::env::var_os("MOAT_EXTRA_CA_CERTS")
        .map(Into::into)
        .into_iter()
        .collect();
    let extra: Vec<&std::path::Path> = extra.iter().map(|p| p.as_path()).collect();
    let sink = move |_| {
        sink_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let gateway = Gateway::new(Arc::new(sink), &extra)?;
    let ca = match std::env::var_os("MOAT_BENCH_CA_OUT") {
        Some(out) => {
            let ca = moat_gateway::tls::new_ca("bench")?;
            std::fs::write(out, &ca.cert)?;
            Some(ca)
        }
        None => None,
    };
    gateway.attach(
        "bench",
        "bench",
        policy,
        ca.as_ref(),
        std::net::TcpListener::bind(addr)?,
    )?;
    println!("listening on {addr}");
    loop {
        std::thread::park();
    }
}

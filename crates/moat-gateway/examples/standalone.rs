//! The gateway on a host port, outside any sandbox, for benchmarks against
//! other proxies: `standalone ADDR [PRESET] [ALLOW-HOST...]`.

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
    let gateway = Gateway::new(
        Arc::new(move |_| {
            sink_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }),
        &[],
    )?;
    gateway.attach(
        "bench",
        "bench",
        policy,
        None,
        std::net::TcpListener::bind(addr)?,
    )?;
    println!("listening on {addr}");
    loop {
        std::thread::park();
    }
}

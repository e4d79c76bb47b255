//! A fast upstream for benchmarks: HTTP/1.1 keep-alive answering `ok` on
//! `HTTP_ADDR`, a raw TCP source that sends N bytes to each connection on
//! `BULK_ADDR`, and optionally the same `ok` over TLS (certificate for
//! `localhost` from a CA written to CA_FILE) on `TLS_ADDR`:
//! `upstream HTTP_ADDR BULK_ADDR BYTES [TLS_ADDR CA_FILE]`.

use std::io::{Read, Write};
use std::net::TcpListener;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let http = TcpListener::bind(args.get(1).map(String::as_str).unwrap_or("127.0.0.1:18100"))?;
    let bulk = TcpListener::bind(args.get(2).map(String::as_str).unwrap_or("127.0.0.1:18101"))?;
    let bytes: u64 = args.get(3).and_then(|b| b.parse().ok()).unwrap_or(1 << 30);
    std::thread::spawn(move || {
        for conn in bulk.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let chunk = vec![0u8; 1 << 20];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if conn.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    if let (Some(addr), Some(ca_file)) = (args.get(4), args.get(5)) {
        let ca = moat_gateway::tls::new_ca("bench upstream").map_err(std::io::Error::other)?;
        std::fs::write(ca_file, &ca.cert)?;
        let leaves = std::sync::Arc::new(
            moat_gateway::tls::Leaves::new(&ca).map_err(std::io::Error::other)?,
        );
        let config = moat_gateway::tls::server_config(&leaves, "localhost")
            .map_err(std::io::Error::other)?;
        let tls = TcpListener::bind(addr)?;
        std::thread::spawn(move || {
            for conn in tls.incoming().flatten() {
                let config = std::sync::Arc::clone(&config);
                std::thread::spawn(move || {
                    let _ = conn.set_nodelay(true);
                    let Ok(server) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    answer_ok(rustls::StreamOwned::new(server, conn));
                });
            }
        });
    }
    for conn in http.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            answer_ok(conn);
        });
    }
    Ok(())
}

/// Answer `ok` to every request head on the stream, keeping it alive.
fn answer_ok(mut conn: impl Read + Write) {
    {
        {
            let mut buf = vec![0u8; 65536];
            let mut have = 0;
            loop {
                match conn.read(&mut buf[have..]) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => have += n,
                }
                // Answer every complete request head in the buffer (no bodies in this benchmark).
                while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                    if conn
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                    buf.copy_within(end + 4..have, 0);
                    have -= end + 4;
                }
                if have == buf.len() {
                    return;
                }
            }
        }
    }
}

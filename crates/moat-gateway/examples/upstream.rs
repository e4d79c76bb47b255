//! A fast upstream for benchmarks: HTTP/1.1 keep-alive answering `ok` on
//! `HTTP_ADDR`, and a raw TCP source that sends N bytes to each connection on
//! `BULK_ADDR`: `upstream HTTP_ADDR BULK_ADDR BYTES`.

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
    for conn in http.incoming().flatten() {
        std::thread::spawn(move || {
            let mut conn = conn;
            let _ = conn.set_nodelay(true);
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
        });
    }
    Ok(())
}

//! Printing: tables, JSON and progress.

use std::io::IsTerminal;

use std::collections::HashMap;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// A spinner on a terminal, with a bar per blob being moved; plain lines otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    bars: MultiProgress,
    transfers: HashMap<String, ProgressBar>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            bar: None,
            bars: MultiProgress::new(),
            transfers: HashMap::new(),
        }
    }

    /// Bytes of blob `id` moved so far.
    pub fn transfer(&mut self, id: &str, done: u64, total: u64) {
        if !std::io::stderr().is_terminal() {
            if done == total {
                eprintln!("{id}: {}", human_size(total));
            }
            return;
        }
        let bars = &self.bars;
        let bar = self.transfers.entry(id.to_string()).or_insert_with(|| {
            let b = bars.add(ProgressBar::new(total));
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_prefix(id.to_string());
            b
        });
        bar.set_position(done);
        if done >= total {
            bar.finish();
        }
    }

    pub fn show(&mut self, message: &str) {
        if !std::io::stderr().is_terminal() {
            eprintln!("{message}");
            return;
        }
        let bars = &self.bars;
        let bar = self.bar.get_or_insert_with(|| {
            let b = bars.add(ProgressBar::new_spinner());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}") {
                b.set_style(style);
            }
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        bar.set_message(message.to_string());
    }

    pub fn warn(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("warning: {message}")),
            None => eprintln!("moat: warning: {message}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Print rows under headers, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(&c);
            } else {
                out.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

pub fn truncate(s: &str, n: usize, no_trunc: bool) -> String {
    if no_trunc || s.chars().count() <= n {
        s.to_string()
    } else {
        let cut: String = s.chars().take(n.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// What `image push` and `model push` print: the digest, and how many
/// blobs went up, were mounted from another repository, or were there.
pub fn print_pushed(reference: &str, summary: &serde_json::Value) {
    let count = |k: &str| summary[k].as_array().map_or(0, Vec::len);
    println!(
        "Pushed {reference}@{} ({} uploaded, {} mounted, {} already there)",
        summary["digest"].as_str().unwrap_or_default(),
        count("uploaded"),
        count("mounted"),
        count("skipped")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_truncation() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(98_000_000), "98.0MB");
        assert_eq!(truncate("abcdef", 4, false), "abc…");
        assert_eq!(truncate("abcdef", 4, true), "abcdef");
    }
}

//! Builds the gVisor tier's guest helper (`guest/main.rs`): a static binary,
//! so that it runs in whatever image a sandbox has. It is one `rustc` call
//! (standard library only, the C library linked statically) rather than a
//! workspace crate, because cargo cannot link one crate of a workspace
//! statically and the rest dynamically. The bytes are embedded in `moat`
//! (see `gvisor::guest`); where the static C library is missing, the helper
//! is empty and the gVisor tier says how to get it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=guest/main.rs");
    println!("cargo:rerun-if-changed=guest/statx.rs");
    println!("cargo:rerun-if-changed=src/user.rs");
    let dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    helper(&rustc, &dir.join("moat-guest"));
    statx(&rustc, &dir.join("statx.so"));
}

/// The guest helper, linked statically.
fn helper(rustc: &str, out: &std::path::Path) {
    let status = Command::new(rustc)
        .args([
            "--edition=2021",
            "--crate-name=moat_guest",
            "--crate-type=bin",
            "-Copt-level=s",
            "-Cpanic=abort",
            "-Ctarget-feature=+crt-static",
            "-Cstrip=symbols",
            "-o",
        ])
        .arg(out)
        .arg("guest/main.rs")
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        println!(
            "cargo:warning=the gVisor guest helper did not build ({status:?}); the gvisor tier needs the static C library (Debian: libc6-dev)"
        );
        let _ = std::fs::write(out, b"");
    }
}

/// The statx library for older gVisor releases (x86_64 only; elsewhere empty).
fn statx(rustc: &str, out: &std::path::Path) {
    let built = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64")
        && Command::new(rustc)
            .args([
                "--edition=2021",
                "--crate-name=moat_statx",
                "--crate-type=cdylib",
                "-Copt-level=s",
                "-Cpanic=abort",
                "-Cstrip=symbols",
                "-o",
            ])
            .arg(out)
            .arg("guest/statx.rs")
            .status()
            .is_ok_and(|s| s.success());
    if !built {
        let _ = std::fs::write(out, b"");
    }
}

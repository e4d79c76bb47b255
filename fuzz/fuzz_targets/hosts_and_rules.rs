//! Host-name normalisation and rule matching on arbitrary input:
//! `cargo fuzz run hosts_and_rules` (nightly, or RUSTC_BOOTSTRAP=1 on stable).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_gateway::fuzzing::check(data));

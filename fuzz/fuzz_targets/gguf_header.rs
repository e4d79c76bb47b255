//! The GGUF header reader on arbitrary bytes: it must return an error, never
//! panic, loop or allocate beyond the input: `cargo fuzz run gguf_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(info) = moat_models::gguf::read_bytes(data) {
        assert!(info.data_end <= data.len() as u64);
    }
});

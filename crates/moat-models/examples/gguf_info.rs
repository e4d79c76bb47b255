//! Prints what moat reads from a GGUF header: `cargo run -p moat-models --example gguf_info FILE`.

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: gguf_info FILE.gguf");
        std::process::exit(2);
    };
    match moat_models::gguf::read_file(std::path::Path::new(&path)) {
        Ok(info) => {
            println!(
                "architecture {} quantization {} parameters {} ({}) context {:?} tensors {} template {} bytes",
                info.architecture(),
                info.quantization(),
                info.parameters,
                info.parameters_label(),
                info.context_length(),
                info.tensor_count,
                info.chat_template().map_or(0, str::len)
            );
        }
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    }
}

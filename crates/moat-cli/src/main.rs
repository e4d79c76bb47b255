//! The `moat` binary: the command line, the daemon (`moat daemon`), and the
//! hidden roles the daemon re-executes it as (a sandbox's init, the layer
//! unpacker, a model worker). The command line only parses arguments, talks to the daemon and
//! prints; the work happens in the library crates.

mod cli;
mod client;
mod model;
mod model_run;
mod output;
mod plugins;
mod terminal;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Hidden roles first: they must not pay for argument parsing or logging.
    if let Some(role) = args.get(1) {
        let rest = &args[2..];
        let code = match role.as_str() {
            moat_sandbox::launch::INIT_ROLE => Some(moat_sandbox::init::main()),
            moat_daemon::UNPACK_ROLE => Some(moat_daemon::unpack_role_main(rest)),
            moat_daemon::SAVE_ROLE => Some(moat_daemon::save_role_main(rest)),
            moat_daemon::REMOVE_ROLE => Some(moat_daemon::remove_role_main(rest)),
            moat_models::engine::ROLE => Some(moat_models::engine::worker_main()),
            _ => None,
        };
        if let Some(code) = code {
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
    }
    // Run by the Docker client as `docker-sandbox` or `docker-model`.
    let args = match plugins::as_plugin(&args) {
        Some(Ok(moat_args)) => moat_args,
        Some(Err(code)) => return ExitCode::from(code.clamp(0, 255) as u8),
        None => args,
    };
    match cli::main(args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("moat: {e:#}");
            ExitCode::from(125)
        }
    }
}

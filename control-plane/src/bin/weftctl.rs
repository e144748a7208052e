//! `weftctl`: command-line client of the Weft control plane's admin API.

use clap::Parser;
use weft_control::ctl::{run, Cli, EXIT_OK, EXIT_USAGE};

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weftctl: starting the runtime: {e}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("weftctl: {e}");
            e.code
        }
    };
    std::process::exit(code);
}

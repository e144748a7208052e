//! `weft-proxy --config bootstrap.yaml`: Weft's sidecar proxy. Logging via `RUST_LOG`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOC: weft_proxy::alloc::Allocator = weft_proxy::alloc::ALLOCATOR;
use tracing_subscriber::EnvFilter;

/// Weft sidecar proxy: receives listeners, routes, clusters and endpoints from the control plane
/// and proxies the local service's HTTP, gRPC and TCP traffic.
#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version)]
struct Args {
    /// Bootstrap YAML (node identity, admin and control-plane addresses, listener addresses).
    #[arg(long, short = 'c', value_name = "FILE", env = "WEFT_PROXY_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let bootstrap = match weft_proxy::config::Bootstrap::load(&args.config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    match weft_proxy::app::run(&bootstrap) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

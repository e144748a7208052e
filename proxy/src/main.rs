//! `weft-proxy --config bootstrap.yaml`: Weft's sidecar proxy. Logging via `RUST_LOG` (changeable at
//! run time: see `weft_proxy::log_level`).
//!
//! `weft-proxy init [...]`: installs the transparent-capture rules of the current network
//! namespace (`weft_proxy::capture`), then exits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOC: weft_proxy::alloc::Allocator = weft_proxy::alloc::ALLOCATOR;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, reload, EnvFilter};

/// Weft sidecar proxy: receives listeners, routes, clusters and endpoints from the control plane
/// and proxies the local service's HTTP, gRPC and TCP traffic.
#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version, args_conflicts_with_subcommands = true)]
struct Args {
    /// Bootstrap YAML (node identity, admin and control-plane addresses, listener addresses).
    #[arg(long, short = 'c', value_name = "FILE", env = "WEFT_PROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Install the transparent-capture iptables rules of this network namespace (IPv4 and
    /// IPv6), or remove them with --uninstall; needs CAP_NET_ADMIN (not with --dry-run).
    Init(weft_proxy::capture::init::InitArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Init(init)) = &args.command {
        return match weft_proxy::capture::init::run(init) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weft-proxy init: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(config) = args.config else {
        eprintln!("weft-proxy: --config FILE (or WEFT_PROXY_CONFIG) is required; `weft-proxy init --help` for the capture rules");
        return ExitCode::from(2);
    };
    // A reloadable filter: the admin port and the control plane can change it at run time
    // (`weft_proxy::log_level`).
    let initial = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| "info".to_owned());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&initial));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    weft_proxy::log_level::install(
        &initial,
        Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
    );
    let bootstrap = match weft_proxy::config::Bootstrap::load(&config) {
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

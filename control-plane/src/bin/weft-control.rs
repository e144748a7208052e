//! `weft-control`: the Weft control plane server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use weft_control::{Config, Server};

/// Weft control plane: serves policies from a directory to every proxy over gRPC.
#[derive(Debug, Parser)]
#[command(name = "weft-control", version)]
struct Args {
    /// Directory of policy files (*.yaml, *.yml): the store, watched for changes and written
    /// by the admin API.
    #[arg(long, value_name = "DIR")]
    policies: PathBuf,
    /// Address of the gRPC server (weft.v1.Discovery, grpc.health.v1, reflection).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15010")]
    grpc: SocketAddr,
    /// Address of the admin HTTP server (weftctl API, /metrics, /healthz).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15011")]
    admin: SocketAddr,
    /// How long a disconnected proxy's endpoint is kept before removal (e.g. 5s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    deregister_grace: Duration,
    /// How long a config push may stay unanswered before it is considered lost: logged,
    /// counted as weft_control_pushes_total{result="timeout"}, and pushed again on the next change.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    push_timeout: Duration,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let server = Server::bind(Config {
        policies: args.policies,
        grpc: args.grpc,
        admin: args.admin,
        deregister_grace: args.deregister_grace,
        push_timeout: args.push_timeout,
    })
    .await?;
    server.serve(shutdown_signal()).await?;
    Ok(())
}

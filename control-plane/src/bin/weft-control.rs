//! `weft-control`: the Weft control plane server (`serve`, the default subcommand) and the
//! operator's `token` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weft_control::ca::{self, CaConfig};
use weft_control::server::IdentityConfig;
use weft_control::token::TokenSecret;
use weft_control::{Config, Server};

/// Weft control plane: serves policies from a directory to every proxy over gRPC, and signs
/// the proxies' certificates. Without a subcommand, `serve` is assumed.
#[derive(Debug, Parser)]
#[command(name = "weft-control", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane (the default).
    Serve(Box<ServeArgs>),
    /// Print the join token of a service (what its proxies send to Identity.Certify). Reads the
    /// secret from the CA directory; run it where the control plane's CA directory is.
    Token(TokenArgs),
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// The control plane's CA directory (its --ca-dir).
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    #[arg(long)]
    service: String,
    #[arg(long, default_value = "default")]
    namespace: String,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
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
    /// Directory of the control plane's own state: registry.json, the registered proxies,
    /// rewritten on every registry change and restored at start. Default: <policies>/.weft-state
    /// (dot-files and dot-directories in the policy directory are not policies).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// After a restart, how long the registrations restored from --state-dir keep their
    /// endpoints for their proxies to reconnect (a reconnect of the same node id reclaims its
    /// entry; the others are removed when it ends). Keep it longer than the proxies' longest
    /// reconnect backoff (5s).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    restart_grace: Duration,
    /// CA directory (created 0700): root or intermediate and their keys, the join-token secret,
    /// roots.pem (what proxies trust the control plane with). Default: <policies>/.weft-ca.
    /// Production: set it (e.g. /var/lib/weft/ca) on persistent storage with tight permissions.
    #[arg(long, value_name = "DIR", env = "WEFT_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// SPIFFE trust domain: identities are spiffe://<trust-domain>/ns/<namespace>/sa/<service>.
    #[arg(long, value_name = "NAME", default_value = "cluster.local")]
    trust_domain: String,
    /// Default and maximum lifetime of an issued proxy certificate.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// A user-supplied root certificate (PEM): the control plane signs with an intermediate
    /// generated from it (kept in --ca-dir) instead of its own self-signed root.
    #[arg(long, value_name = "PEM", requires = "root_key")]
    root_cert: Option<PathBuf>,
    /// The private key of --root-cert: PEM PKCS#8 ("BEGIN PRIVATE KEY"; convert an "EC PRIVATE
    /// KEY" with `openssl pkcs8 -topk8 -nocrypt`).
    #[arg(long, value_name = "PEM", requires = "root_cert")]
    root_key: Option<PathBuf>,
    /// Lifetime of the intermediate generated from --root-cert (capped at the root's expiry).
    #[arg(long, value_name = "DURATION", default_value = "365days", value_parser = humantime::parse_duration)]
    intermediate_ttl: Duration,
    /// Another trusted root (PEM file, may hold several), repeatable: root rotation adds the new
    /// root here first, so every proxy trusts it before it signs. Re-read on SIGHUP.
    #[arg(long = "extra-root", value_name = "PEM")]
    extra_roots: Vec<PathBuf>,
    /// Serve the gRPC port over TLS with a certificate from the CA (clients trust
    /// <ca-dir>/roots.pem). This is the default; the flag is accepted for explicitness.
    #[arg(long, conflicts_with = "insecure_grpc")]
    grpc_tls: bool,
    /// Plaintext gRPC instead of TLS (development and debugging only).
    #[arg(long)]
    insecure_grpc: bool,
    /// Another DNS name or IP for the gRPC server certificate (repeatable; `localhost` and the
    /// listen IP are always included).
    #[arg(
        long = "tls-san",
        value_name = "NAME",
        conflicts_with = "insecure_grpc"
    )]
    tls_sans: Vec<String>,
}

/// `weft-control --policies ...` (no subcommand) means `weft-control serve --policies ...`.
fn with_default_subcommand(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let explicit = args.get(1).and_then(|a| a.to_str()).is_some_and(|a| {
        matches!(
            a,
            "serve" | "token" | "help" | "-h" | "--help" | "-V" | "--version"
        )
    });
    if !explicit {
        args.insert(1.min(args.len()), "serve".into());
    }
    args
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(with_default_subcommand(std::env::args_os().collect()));
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => {
            for (what, value) in [("namespace", &args.namespace), ("service", &args.service)] {
                anyhow::ensure!(
                    ca::valid_name(value),
                    "invalid {what} {value:?}: expected a DNS label"
                );
            }
            let secret = TokenSecret::load(&args.ca_dir)?;
            println!("{}", secret.token(&args.namespace, &args.service));
            Ok(())
        }
    }
}

#[tokio::main]
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let ca_dir = args
        .ca_dir
        .unwrap_or_else(|| args.policies.join(".weft-ca"));
    let identity = Some(IdentityConfig {
        ca: CaConfig {
            dir: ca_dir,
            trust_domain: args.trust_domain,
            cert_ttl: args.cert_ttl,
            root: args.root_cert.zip(args.root_key),
            extra_roots: args.extra_roots,
            intermediate_ttl: args.intermediate_ttl,
        },
        grpc_tls: args.grpc_tls || !args.insecure_grpc,
        tls_sans: args.tls_sans,
    });
    if args.insecure_grpc {
        tracing::warn!("--insecure-grpc: the gRPC port (discovery, identity) is plaintext");
    }
    let server = Server::bind_with(
        Config {
            policies: args.policies,
            grpc: args.grpc,
            admin: args.admin,
            deregister_grace: args.deregister_grace,
            push_timeout: args.push_timeout,
            state_dir: args.state_dir,
            restart_grace: args.restart_grace,
        },
        identity,
    )
    .await?;
    #[cfg(unix)]
    if let Some(ca) = server.ca().cloned() {
        spawn_sighup_reload(Arc::clone(server.control_plane()), ca);
    }
    server.serve(shutdown_signal()).await?;
    Ok(())
}

/// SIGHUP re-reads the --extra-root files and pushes a changed trust bundle.
#[cfg(unix)]
fn spawn_sighup_reload(cp: Arc<weft_control::state::ControlPlane>, ca: Arc<weft_control::ca::Ca>) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the extra roots");
                    let (cp, ca) = (Arc::clone(&cp), Arc::clone(&ca));
                    let _ = tokio::task::spawn_blocking(move || {
                        weft_control::server::reload_trust(&cp, &ca);
                    })
                    .await;
                }
            });
        }
        Err(e) => tracing::warn!("cannot listen for SIGHUP (no trust reload): {e}"),
    }
}

//! `weft-control`: the Weft control plane server (`serve`, the default subcommand) and the
//! operator's `token` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weft_control::admission::Limits;
use weft_control::ca::{self, CaConfig};
use weft_control::inject::review::FailurePolicy;
use weft_control::inject::server::{InjectServer, InjectSettings};
use weft_control::server::IdentityConfig;
use weft_control::store::etcd::EtcdTls;
use weft_control::store::EtcdConfig;
use weft_control::token::kubernetes::{KubernetesTokenConfig, KubernetesTokens};
use weft_control::token::TokenSecret;
use weft_control::{Config, Server, StoreConfig};

/// jemalloc, as in the proxy (`proxy/src/alloc.rs`; its configuration, `dirty_decay_ms:1000`
/// with one background purging thread, is set at build time in `.cargo/config.toml`): the
/// control plane holds a TLS + HTTP/2 + gRPC stream per proxy, thousands of small buffers that
/// glibc's per-thread arenas fragment (benches/RESULTS.md, control-plane scale: peak RSS at
/// 5,000 proxies).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Issue an admin client certificate for weftctl (`--cert`/`--key`), signed by the CA in the
    /// CA directory: writes <out>/<name>.pem and <out>/<name>-key.pem (0600).
    AdminCert(AdminCertArgs),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AdminRole {
    /// Reads, validate and diff.
    Read,
    /// Everything, including apply and delete.
    Write,
}

#[derive(Debug, clap::Args)]
struct AdminCertArgs {
    /// The control plane's CA directory (its --ca-dir).
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// Who the certificate is for (a DNS label); it appears in the audit log.
    #[arg(long)]
    name: String,
    /// What it may do.
    #[arg(long, value_enum, default_value = "read")]
    role: AdminRole,
    /// Lifetime (capped at the CA's expiry). There is no revocation list: keep it short.
    #[arg(long, value_name = "DURATION", default_value = "720h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The control plane's --trust-domain.
    #[arg(long, value_name = "NAME", default_value = "cluster.local")]
    trust_domain: String,
    /// Where to write the certificate and key.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
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

/// Where policies and registrations live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// One replica: --policies DIR and registry.json in --state-dir.
    Files,
    /// Several replicas sharing etcd v3 (--etcd-endpoints).
    Etcd,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Directory of policy files (*.yaml, *.yml): the store, watched for changes and written
    /// by the admin API. Required with --store files (the default).
    #[arg(long, value_name = "DIR")]
    policies: Option<PathBuf>,
    /// Where policies and registrations live: `files` (one replica, the default) or `etcd`
    /// (several replicas share policies and registrations; every replica needs the same CA
    /// files, so --ca-dir is required).
    #[arg(long, value_enum, default_value = "files")]
    store: StoreKind,
    /// etcd members, comma-separated: http://host:port or https://host:port (with --etcd-ca).
    #[arg(
        long,
        value_name = "URLS",
        value_delimiter = ',',
        required_if_eq("store", "etcd")
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this mesh in etcd (several meshes can share one etcd).
    #[arg(long, value_name = "PREFIX", default_value = "/weft")]
    etcd_prefix: String,
    /// TTL of this replica's etcd lease (whole seconds, at least 2s): if the replica dies or
    /// loses etcd, its proxies' registrations disappear this long after, and are removed
    /// --deregister-grace later unless the proxies reconnected to another replica.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    etcd_lease_ttl: Duration,
    /// Time limit of one etcd request (an apply then fails with 503).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    etcd_timeout: Duration,
    /// How long a starting replica waits for etcd to answer before it gives up.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    etcd_start_timeout: Duration,
    /// PEM of the CA that signed etcd's server certificates (https:// endpoints).
    #[arg(long, value_name = "PEM")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth, with --etcd-key.
    #[arg(long, value_name = "PEM", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, value_name = "PEM", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user (etcd authentication), with --etcd-password-file.
    #[arg(long, value_name = "NAME", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// A file holding the password of --etcd-user (its first line).
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// This replica's name, unique among the replicas sharing etcd (it is recorded in the
    /// registrations of its proxies). Default: <hostname>-<grpc address>.
    #[arg(long, value_name = "NAME")]
    replica_id: Option<String>,
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
    /// How long a proxy's stream waits after a change before compiling and pushing it, so a
    /// burst of changes (proxies connecting together, a rollout) becomes one push.
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = humantime::parse_duration)]
    push_debounce: Duration,
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
    /// Another DNS name or IP for the server certificate of the gRPC and admin ports
    /// (repeatable; `localhost` and the listen IPs are always included).
    #[arg(long = "tls-san", value_name = "NAME")]
    tls_sans: Vec<String>,
    /// How long a proxy may take to send its Hello after opening a discovery stream.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    hello_timeout: Duration,
    /// Most registrations (connected proxies and those within their grace).
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    max_registrations: usize,
    /// Most registrations of one service.
    #[arg(long, value_name = "N", default_value_t = 5_000)]
    max_registrations_per_service: usize,
    /// Refuse a registration whose inbound_address is not on the IP its stream comes from
    /// (hosts and pods without NAT between the proxies and the control plane).
    #[arg(long)]
    require_peer_address: bool,
    /// Most open gRPC connections; more are closed at accept
    /// (weft_control_connections_refused_total{server="grpc"}).
    #[arg(long, value_name = "N", default_value_t = weft_control::server::DEFAULT_GRPC_MAX_CONNECTIONS)]
    grpc_max_connections: usize,
    /// Most concurrent HTTP/2 streams per gRPC connection.
    #[arg(long, value_name = "N", default_value_t = weft_control::server::DEFAULT_GRPC_MAX_STREAMS)]
    grpc_max_streams: u32,
    /// Most open admin API connections.
    #[arg(long, value_name = "N", default_value_t = weft_control::server::DEFAULT_ADMIN_MAX_CONNECTIONS)]
    admin_max_connections: usize,
    /// A file of admin API bearer tokens, lines `<name> <read|write> <token>` (repeatable;
    /// re-read on SIGHUP).
    #[arg(long = "admin-tokens", value_name = "FILE")]
    admin_token_files: Vec<PathBuf>,
    /// Do not write or accept the bootstrap admin token (<ca-dir>/admin-token, role write).
    #[arg(long)]
    no_admin_bootstrap_token: bool,
    /// Serve the admin API in plaintext with no authentication (development only; refused on a
    /// non-loopback --admin address).
    #[arg(long)]
    insecure_admin: bool,
    /// Kubernetes: the service-account issuer's public keys (JWKS JSON, as the API server
    /// serves at /openid/v1/jwks; re-read when it changes). Identity.Certify then also takes a
    /// pod's projected ServiceAccount token, certified as <namespace>/<ServiceAccount name>.
    #[arg(long, value_name = "FILE", requires = "k8s_issuer")]
    k8s_jwks: Option<PathBuf>,
    /// The `iss` of those tokens (the API server's --service-account-issuer).
    #[arg(long, value_name = "URL", requires = "k8s_jwks")]
    k8s_issuer: Option<String>,
    /// The audience the injected projected token is requested for (inject.yaml's
    /// identity.tokenAudience).
    #[arg(long, value_name = "NAME", default_value = "weft")]
    k8s_audience: String,
    /// Kubernetes: serve the sidecar injection webhook (HTTPS, POST /inject, GET /healthz) here,
    /// e.g. 0.0.0.0:15017. Absent: no webhook.
    #[arg(long, value_name = "ADDR", requires_all = ["inject_tls_cert", "inject_tls_key", "inject_config"])]
    inject_addr: Option<SocketAddr>,
    /// The webhook's serving certificate (PEM chain; re-read when it changes).
    #[arg(long, value_name = "PEM", requires = "inject_addr")]
    inject_tls_cert: Option<PathBuf>,
    /// The webhook's private key (PEM; re-read when it changes).
    #[arg(long, value_name = "PEM", requires = "inject_addr")]
    inject_tls_key: Option<PathBuf>,
    /// What the webhook injects (YAML: proxy image and resources, control-plane address,
    /// identity, capture exclusions; re-read when it changes).
    #[arg(long, value_name = "FILE", requires = "inject_addr")]
    inject_config: Option<PathBuf>,
    /// Deny a pod when the webhook itself fails to build its sidecar (use with the webhook's
    /// failurePolicy: Fail). Default: admit it without a sidecar, with a warning (failurePolicy:
    /// Ignore).
    #[arg(long, requires = "inject_addr")]
    inject_fail_closed: bool,
}

/// `weft-control --policies ...` (no subcommand) means `weft-control serve --policies ...`.
fn with_default_subcommand(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let explicit = args.get(1).and_then(|a| a.to_str()).is_some_and(|a| {
        matches!(
            a,
            "serve" | "token" | "admin-cert" | "help" | "-h" | "--help" | "-V" | "--version"
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
        Command::AdminCert(args) => admin_cert(&args),
    }
}

fn admin_cert(args: &AdminCertArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    anyhow::ensure!(
        args.ca_dir.join("root.pem").exists(),
        "{}: no CA here (root.pem missing): point --ca-dir at the control plane's CA directory",
        args.ca_dir.display()
    );
    let mut config = CaConfig::new(&args.ca_dir);
    config.trust_domain.clone_from(&args.trust_domain);
    let ca = ca::Ca::load_or_create(&config)?;
    let role = match args.role {
        AdminRole::Read => "read",
        AdminRole::Write => "write",
    };
    let cert = ca.issue_admin(&args.name, role, args.ttl)?;
    let pem = |label: &str, der: &[u8]| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    };
    let chain: String = cert
        .chain_der
        .iter()
        .map(|d| pem("CERTIFICATE", d))
        .collect();
    std::fs::create_dir_all(&args.out)?;
    let cert_path = args.out.join(format!("{}.pem", args.name));
    let key_path = args.out.join(format!("{}-key.pem", args.name));
    std::fs::write(&cert_path, chain)?;
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)?;
    key.write_all(pem("PRIVATE KEY", &cert.key_der).as_bytes())?;
    println!(
        "wrote {} and {} (spiffe://{}/weft-admin/{role}/{}, until {})",
        cert_path.display(),
        key_path.display(),
        args.trust_domain,
        args.name,
        ca::rfc3339(cert.not_after)
    );
    Ok(())
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
    let store = store_config(&args)?;
    let policies = args.policies.clone().unwrap_or_default();
    let ca_dir = match (args.ca_dir, &store) {
        (Some(dir), _) => dir,
        (None, StoreConfig::Files) => policies.join(".weft-ca"),
        (None, StoreConfig::Etcd(_)) => anyhow::bail!(
            "--store etcd needs --ca-dir: every replica must have the same CA files (root, its \
             key or --root-cert/--root-key, token.key), so they cannot default to a directory \
             of this replica's own"
        ),
    };
    let kubernetes_tokens = match (&args.k8s_jwks, &args.k8s_issuer) {
        (Some(jwks), Some(issuer)) => Some(std::sync::Arc::new(KubernetesTokens::load(
            KubernetesTokenConfig {
                jwks: jwks.clone(),
                issuer: issuer.clone(),
                audience: args.k8s_audience.clone(),
            },
        )?)),
        _ => None,
    };
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
        kubernetes_tokens,
    });
    let server = Server::bind_with(
        Config {
            policies,
            store,
            grpc: args.grpc,
            admin: args.admin,
            deregister_grace: args.deregister_grace,
            push_timeout: args.push_timeout,
            push_debounce: args.push_debounce,
            state_dir: args.state_dir,
            restart_grace: args.restart_grace,
            limits: Limits {
                hello_timeout: args.hello_timeout,
                max_registrations: args.max_registrations,
                max_registrations_per_service: args.max_registrations_per_service,
                require_peer_address: args.require_peer_address,
                ..Limits::default()
            },
            grpc_max_connections: args.grpc_max_connections,
            grpc_max_streams: args.grpc_max_streams,
            admin_max_connections: args.admin_max_connections,
            insecure_admin: args.insecure_admin,
            admin_token_files: args.admin_token_files,
            admin_bootstrap_token: !args.no_admin_bootstrap_token,
        },
        identity,
    )
    .await?;
    if args.insecure_admin {
        tracing::warn!("INSECURE: the admin API is plaintext and unauthenticated (--insecure-admin): anyone who can reach it can change every policy. Development only.");
    }
    if let (Some(addr), Some(tls_cert), Some(tls_key), Some(config)) = (
        args.inject_addr,
        args.inject_tls_cert,
        args.inject_tls_key,
        args.inject_config,
    ) {
        let settings = InjectSettings {
            addr,
            tls_cert,
            tls_key,
            config,
            failure_policy: if args.inject_fail_closed {
                FailurePolicy::Closed
            } else {
                FailurePolicy::Open
            },
        };
        let webhook =
            InjectServer::bind(&settings, std::sync::Arc::clone(server.control_plane())).await?;
        // Ends with the process.
        tokio::spawn(webhook.serve(std::future::pending()));
    }
    #[cfg(unix)]
    spawn_sighup_reload(server.reloader());
    server.serve(shutdown_signal()).await?;
    Ok(())
}

/// The store backend the flags select.
fn store_config(args: &ServeArgs) -> anyhow::Result<StoreConfig> {
    if args.store == StoreKind::Files {
        anyhow::ensure!(
            args.policies.is_some(),
            "--policies DIR is required with --store files (the default)"
        );
        return Ok(StoreConfig::Files);
    }
    let replica_id = match &args.replica_id {
        Some(id) => id.clone(),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "weft-control".to_owned());
            format!("{host}-{}", args.grpc)
        }
    };
    let mut etcd = EtcdConfig::new(args.etcd_endpoints.clone(), replica_id);
    etcd.prefix.clone_from(&args.etcd_prefix);
    etcd.lease_ttl = args.etcd_lease_ttl;
    etcd.request_timeout = args.etcd_timeout;
    etcd.start_timeout = args.etcd_start_timeout;
    etcd.tls = args.etcd_ca.clone().map(|ca| EtcdTls {
        ca,
        identity: args.etcd_cert.clone().zip(args.etcd_key.clone()),
    });
    if let (Some(user), Some(file)) = (&args.etcd_user, &args.etcd_password_file) {
        let password = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("--etcd-password-file {}: {e}", file.display()))?;
        let password = password.lines().next().unwrap_or_default().to_owned();
        etcd.user = Some((user.clone(), password));
    }
    etcd.validate().map_err(anyhow::Error::msg)?;
    Ok(StoreConfig::Etcd(Box::new(etcd)))
}

/// SIGHUP re-reads the --extra-root files (pushing a changed trust bundle) and the admin
/// tokens.
#[cfg(unix)]
fn spawn_sighup_reload(reloader: weft_control::server::Reloader) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the extra roots and admin tokens");
                    let reloader = reloader.clone();
                    let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
                }
            });
        }
        Err(e) => tracing::warn!("cannot listen for SIGHUP (no reload): {e}"),
    }
}

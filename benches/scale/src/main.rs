//! `weft-scale`: the control-plane scale benchmark. It simulates N proxies as lightweight gRPC
//! clients speaking the real authenticated protocol (an SVID each from `Identity.Certify`, its
//! own TLS connection with that client certificate, a real Hello, every push decoded and ACKed
//! like `weft-proxy` does) on a small tokio runtime, and measures what N proxies cost the
//! control plane: cold-start convergence, apply → last ACK, CPU, peak RSS, bytes per push,
//! compilations. See benches/README.md ("Control-plane scale").
//!
//! - `weft-scale run`: starts the control plane itself (one replica on a policy directory, or
//!   `--replicas 3` on a 3-member etcd cluster), all on loopback, stopped by PID at the end.
//! - `weft-scale attach`: against replicas someone else started (the e2e smoke test).
//! - `weft-scale table`: the markdown table of several runs' JSON reports.

mod control;
mod mesh;
mod procs;
mod report;
mod run;
mod sim;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::control::{Replica, StartSpec};
use crate::run::{Options, Report, Setup};

#[derive(Debug, Parser)]
#[command(
    name = "weft-scale",
    version,
    about = "Weft control-plane scale benchmark: N simulated proxies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the control plane (and etcd for --replicas > 1) and measure.
    Run(RunArgs),
    /// Measure control-plane replicas that are already running.
    Attach(AttachArgs),
    /// Print the markdown table (and the targets) of JSON reports.
    Table {
        /// Reports written by --json.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Simulated proxies.
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// Services they run (round-robin); default N/10 (at least 1), so scopes repeat.
    #[arg(long)]
    services: Option<usize>,
    /// `dependencies:` per service (the next K services); 0 = none declared, every proxy may
    /// call every service. Default 3 (fewer when there are fewer other services).
    #[arg(long)]
    deps: Option<usize>,
    /// Worker threads of the generator's tokio runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Most TLS handshakes + stream opens in flight.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Most Certify calls in flight.
    #[arg(long, default_value_t = 16)]
    certify_concurrency: usize,
    /// Bound of each phase (cold start, each apply).
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    phase_timeout: Duration,
    /// How long without any push ends a phase.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    quiet: Duration,
    /// Where weftctl (and, for `run`, weft-control) are.
    #[arg(long, value_name = "DIR", default_value = "target/release")]
    bin_dir: PathBuf,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Before starting, wait up to this long for the 1-minute load average to drop below 1.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    wait_quiet: Duration,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Control-plane replicas: 1 = one replica with a policy directory (file store); more =
    /// that many replicas on a 3-member etcd cluster (`--store etcd`).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Keep the scratch directory (logs, CA, etcd data) here instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
    /// One more weft-control argument (repeatable), e.g. --cp-arg=--push-debounce=20ms.
    #[arg(long = "cp-arg", value_name = "ARG", allow_hyphen_values = true)]
    cp_args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct AttachArgs {
    #[command(flatten)]
    common: Common,
    /// gRPC URLs of the replicas (https://ip:port), comma-separated; proxies are spread over
    /// them.
    #[arg(long, value_delimiter = ',', required = true)]
    grpc: Vec<String>,
    /// Admin URLs of the same replicas, in the same order (the first one takes the applies).
    #[arg(long, value_delimiter = ',', required = true)]
    admin: Vec<String>,
    /// Their CA directory (roots.pem, token.key, admin-token).
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// Scratch directory for the applied policy files (default: a temporary one).
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
}

fn options(c: &Common) -> Options {
    let services = c.services.unwrap_or((c.n / 10).max(1));
    Options {
        n: c.n,
        services,
        deps: c.deps.unwrap_or(3.min(services - 1)),
        connect_concurrency: c.connect_concurrency,
        certify_concurrency: c.certify_concurrency,
        phase_timeout: c.phase_timeout,
        quiet: c.quiet,
        threads: c.threads.max(1),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Table { reports } => {
            let mut all: Vec<Report> = Vec::new();
            for path in &reports {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
                all.push(
                    serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?,
                );
            }
            print!("{}", report::table(&all));
            let targets = report::targets(&all);
            if !targets.is_empty() {
                println!("\nTargets (issue 15):\n\n{targets}");
            }
            Ok(())
        }
        Command::Run(args) => runtime(args.common.threads)?.block_on(interruptible(run(args))),
        Command::Attach(args) => {
            runtime(args.common.threads)?.block_on(interruptible(attach(args)))
        }
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

/// Runs `f`; SIGINT or SIGTERM drops it (which stops every process it started).
async fn interruptible(
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = f => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}

/// Waits (up to `bound`) for the 1-minute load average to drop below 1.
async fn wait_for_quiet(bound: Duration) {
    if bound.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let (one, line) = procs::loadavg();
        if one < 1.0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("weft-scale: loadavg still {line} after {bound:?}; measuring anyway");
            return;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn scratch(work: Option<PathBuf>) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match work {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            Ok((dir, None))
        }
        None => {
            let t = tempfile::Builder::new().prefix("weft-scale-").tempdir()?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

fn finish(report: &Report, json: Option<&PathBuf>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    if let Some(path) = json {
        std::fs::write(path, &text).with_context(|| format!("{}", path.display()))?;
    }
    println!("{text}");
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let opts = options(&args.common);
    let fd_limit = procs::raise_fd_limit();
    // Each simulated proxy holds one socket here and one in the control plane.
    anyhow::ensure!(
        fd_limit > (opts.n as u64) + 256,
        "the open-file limit is {fd_limit}: too low for {} proxies (raise ulimit -n)",
        opts.n
    );
    wait_for_quiet(args.common.wait_quiet).await;
    let (work, _temp) = scratch(args.work)?;
    let ca_dir = work.join("ca");
    let etcd = if args.replicas > 1 {
        Some(procs::Etcd::start(3, &work).await?)
    } else {
        None
    };
    let replicas = Replica::start_all(&StartSpec {
        bin_dir: &args.common.bin_dir,
        work: &work,
        ca_dir: &ca_dir,
        etcd: etcd.as_ref().map(|e| e.client_urls.as_slice()),
        replicas: args.replicas.max(1),
        max_registrations: (opts.n * 2).max(20_000),
        max_per_service: opts.n.max(5_000),
        extra_args: &args.cp_args,
    })
    .await?;
    let setup = Setup {
        replicas,
        etcd,
        ca_dir,
        bin_dir: args.common.bin_dir.clone(),
        work,
    };
    let report = run::execute(&opts, setup, fd_limit).await?;
    finish(&report, args.common.json.as_ref())
}

async fn attach(args: AttachArgs) -> anyhow::Result<()> {
    let opts = options(&args.common);
    let fd_limit = procs::raise_fd_limit();
    anyhow::ensure!(
        args.grpc.len() == args.admin.len(),
        "--grpc and --admin must list the same replicas ({} and {} given)",
        args.grpc.len(),
        args.admin.len()
    );
    wait_for_quiet(args.common.wait_quiet).await;
    let (work, _temp) = scratch(args.work)?;
    let replicas = args
        .grpc
        .iter()
        .zip(&args.admin)
        .enumerate()
        .map(|(i, (g, a))| {
            Replica::attach(
                format!("replica-{}", i + 1),
                g.clone(),
                a.clone(),
                &args.ca_dir,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let setup = Setup {
        replicas,
        etcd: None,
        ca_dir: args.ca_dir,
        bin_dir: args.common.bin_dir.clone(),
        work,
    };
    let report = run::execute(&opts, setup, fd_limit).await?;
    finish(&report, args.common.json.as_ref())
}

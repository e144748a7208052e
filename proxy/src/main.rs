//! `weft-proxy --config bootstrap.yaml`: Weft's sidecar proxy. Logging via `RUST_LOG` (changeable at
//! run time: see `weft_proxy::log_level`).
//!
//! `weft-proxy init [...]`: installs the transparent-capture rules of the current network
//! namespace (`weft_proxy::capture`), then exits.
//!
//! Without `--config`, the bootstrap YAML may come from the env var `WEFT_BOOTSTRAP` (what the
//! Kubernetes injection webhook sets, so no per-pod ConfigMap is needed): `${NAME}` in it is
//! replaced by the env var `NAME` (the pod's `POD_IP`, `POD_NAME`, `POD_NAMESPACE` from the
//! downward API; an IPv6 address followed by `:port` is bracketed), an unset one is an error.
//! `WEFT_CONTROL_PLANE_CA` (PEM) is then written to the bootstrap's `control_plane_ca` path, and
//! `WEFT_APP_PROBES` (the app's rewritten kubelet probes) is served on the admin port
//! (`weft_proxy::app_health`).

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
    /// Without it, the YAML in the env var WEFT_BOOTSTRAP (${VAR} replaced by env vars).
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
    let env_bootstrap = std::env::var(BOOTSTRAP_ENV).ok();
    if args.config.is_none() && env_bootstrap.is_none() {
        eprintln!("weft-proxy: --config FILE (or WEFT_PROXY_CONFIG, or the bootstrap YAML in {BOOTSTRAP_ENV}) is required; `weft-proxy init --help` for the capture rules");
        return ExitCode::from(2);
    }
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
    let bootstrap = match (&args.config, env_bootstrap) {
        (Some(config), _) => weft_proxy::config::Bootstrap::load(config).map_err(|e| e.to_string()),
        (None, Some(text)) => bootstrap_from_env(&text, |name| std::env::var(name).ok()),
        // Checked above.
        (None, None) => Err("no bootstrap".to_owned()),
    };
    let bootstrap = match bootstrap {
        Ok(b) => b,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = install_app_probes(&bootstrap, std::env::var(APP_PROBES_ENV).ok()) {
        eprintln!("weft-proxy: {e}");
        return ExitCode::from(2);
    }
    match weft_proxy::app::run(&bootstrap) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The bootstrap YAML when there is no `--config`.
const BOOTSTRAP_ENV: &str = "WEFT_BOOTSTRAP";
/// PEM roots of the control plane, written to the bootstrap's `control_plane_ca`.
const CONTROL_PLANE_CA_ENV: &str = "WEFT_CONTROL_PLANE_CA";
use weft_proxy::app_health::APP_PROBES_ENV;

/// Replaces every `${NAME}` in `text` by `lookup(NAME)`; an IPv6 address directly followed by
/// `:` (a port) is written `[addr]`. An unset variable or an unclosed `${` is an error.
fn substitute(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            format!(
                "{BOOTSTRAP_ENV}: an unclosed ${{ at {:?}",
                &rest[start..rest.len().min(start + 20)]
            )
        })?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "{BOOTSTRAP_ENV}: ${{{name}}} is not an env var name"
            ));
        }
        let value = lookup(name).ok_or_else(|| {
            format!("{BOOTSTRAP_ENV}: ${{{name}}} is used but the env var {name} is not set")
        })?;
        rest = &after[end + 1..];
        if rest.starts_with(':') && value.parse::<std::net::Ipv6Addr>().is_ok() {
            out.push('[');
            out.push_str(&value);
            out.push(']');
        } else {
            out.push_str(&value);
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The bootstrap from `WEFT_BOOTSTRAP`'s `text`, env vars substituted; the control plane's CA
/// (`WEFT_CONTROL_PLANE_CA`) written where the bootstrap's `control_plane_ca` says.
fn bootstrap_from_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<weft_proxy::config::Bootstrap, String> {
    let yaml = substitute(text, &lookup)?;
    let mut bootstrap =
        weft_proxy::config::Bootstrap::parse(&yaml, BOOTSTRAP_ENV).map_err(|e| e.to_string())?;
    // As `Bootstrap::load` does for a file.
    if let Some(threads) = lookup(weft_proxy::config::WORKER_THREADS_ENV) {
        bootstrap.worker_threads = Some(
            weft_proxy::config::parse_worker_threads(&threads)
                .map_err(|e| format!("{}: {e}", weft_proxy::config::WORKER_THREADS_ENV))?,
        );
    }
    bootstrap
        .tunnel
        .apply_env(lookup(weft_proxy::tunnel::ENV).as_deref())?;
    if let Some(pem) = lookup(CONTROL_PLANE_CA_ENV) {
        let path = bootstrap.control_plane_ca.as_ref().ok_or_else(|| {
            format!("{CONTROL_PLANE_CA_ENV} is set but the bootstrap has no control_plane_ca path to write it to")
        })?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!("{CONTROL_PLANE_CA_ENV}: no PEM certificate in it"));
        }
        // Written whole then renamed: the control-plane client reads it at every connect.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pem.as_bytes())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("{CONTROL_PLANE_CA_ENV}: writing {}: {e}", path.display()))?;
    }
    Ok(bootstrap)
}

/// Serves `WEFT_APP_PROBES` on the admin port; the probes reach the app on the transparent
/// instance IP (else loopback).
fn install_app_probes(
    bootstrap: &weft_proxy::config::Bootstrap,
    json: Option<String>,
) -> Result<(), String> {
    let Some(json) = json.filter(|j| !j.trim().is_empty()) else {
        return Ok(());
    };
    let ip = bootstrap
        .transparent
        .as_ref()
        .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), |t| {
            t.instance_ip
        });
    let probes = weft_proxy::app_health::AppProbes::parse(&json, ip)?;
    tracing::info!(
        probes = probes.len(),
        "serving the app's kubelet probes on the admin port"
    );
    probes.install();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn env_vars_are_substituted_and_ipv6_bracketed_before_a_port() {
        let vars = [("POD_IP", "10.1.2.3"), ("POD_NAME", "web-1")];
        assert_eq!(
            substitute("a: ${POD_IP}:15006\nb: ${POD_NAME}.x", env(&vars)).unwrap(),
            "a: 10.1.2.3:15006\nb: web-1.x"
        );
        let v6 = [("POD_IP", "fd00::5")];
        assert_eq!(
            substitute("a: ${POD_IP}:15006 ip: ${POD_IP}", env(&v6)).unwrap(),
            "a: [fd00::5]:15006 ip: fd00::5"
        );
        assert!(substitute("${NOPE}", env(&vars))
            .unwrap_err()
            .contains("NOPE is not set"));
        assert!(substitute("x ${POD_IP", env(&vars))
            .unwrap_err()
            .contains("unclosed"));
        assert!(substitute("${a b}", env(&vars))
            .unwrap_err()
            .contains("not an env var name"));
    }

    #[test]
    fn the_webhooks_bootstrap_loads_and_writes_the_ca() {
        let dir = std::env::temp_dir().join(format!("weft-bootstrap-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let yaml = format!(
            "node: {{service: web, namespace: shop, id: '${{POD_NAME}}.${{POD_NAMESPACE}}'}}\n\
             admin: 0.0.0.0:15000\ncontrol_plane: https://cp.weft-system.svc:15010\n\
             control_plane_ca: {}\njoin_token_file: /t/token\n\
             inbound: {{address: '${{POD_IP}}:15006'}}\n\
             transparent: {{instance_ip: '${{POD_IP}}', app_ports: [8080]}}\n",
            ca.display()
        );
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let vars = [
            ("POD_IP", "10.1.2.3"),
            ("POD_NAME", "web-1"),
            ("POD_NAMESPACE", "shop"),
            (CONTROL_PLANE_CA_ENV, pem),
        ];
        let b = bootstrap_from_env(&yaml, env(&vars)).unwrap();
        assert_eq!(b.node.id.as_deref(), Some("web-1.shop"));
        assert_eq!(b.inbound.address.to_string(), "10.1.2.3:15006");
        assert_eq!(
            b.transparent.as_ref().unwrap().instance_ip.to_string(),
            "10.1.2.3"
        );
        assert_eq!(std::fs::read_to_string(&ca).unwrap(), pem);
        let e = bootstrap_from_env(&yaml, env(&vars[1..])).unwrap_err();
        assert!(e.contains("POD_IP"), "{e}");
        let bad_ca = [vars[0], vars[1], vars[2], (CONTROL_PLANE_CA_ENV, "x")];
        assert!(bootstrap_from_env(&yaml, env(&bad_ca))
            .unwrap_err()
            .contains("PEM"));
        let e = bootstrap_from_env("node: {service: ''}", env(&vars)).unwrap_err();
        assert!(
            e.contains(BOOTSTRAP_ENV) && e.contains("node.service"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

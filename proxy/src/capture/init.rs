//! `weft-proxy init`: installs (or with `--uninstall` removes) the capture rules of the current
//! network namespace; `--dry-run` prints the `iptables-restore` input instead of applying it.

use clap::Args;

use super::iptables::{has_net_admin, Backend, IptablesError, Tools};
use super::rules::{install_script, parse_save, uninstall_script, Family};
use super::{CaptureConfig, Cidr};

/// Options of `weft-proxy init`.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// The proxy's user id: its own connections are never captured (repeatable, or a,b).
    #[arg(long = "proxy-uid", value_name = "UID", value_delimiter = ',')]
    pub proxy_uids: Vec<u32>,
    /// The proxy's (primary) group id: likewise (repeatable, or a,b).
    #[arg(long = "proxy-gid", value_name = "GID", value_delimiter = ',')]
    pub proxy_gids: Vec<u32>,
    /// Port captured outbound TCP is redirected to (the proxy's outbound listener).
    #[arg(long, default_value_t = super::DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Port captured inbound TCP is redirected to (the proxy's inbound listener).
    #[arg(long, default_value_t = super::DEFAULT_INBOUND_PORT)]
    pub inbound_port: u16,
    /// The proxy's admin port (never captured inbound).
    #[arg(long, default_value_t = super::DEFAULT_ADMIN_PORT)]
    pub admin_port: u16,
    /// Port of the mesh DNS server DNS queries (UDP and TCP 53) are redirected to.
    #[arg(long, default_value_t = super::DEFAULT_DNS_PORT)]
    pub dns_port: u16,
    /// Do not redirect DNS.
    #[arg(long)]
    pub no_dns: bool,
    /// Inbound destination ports not captured (e.g. 22), comma-separated or repeated.
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports not captured.
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound source networks not captured (CIDR or address).
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub exclude_inbound_cidrs: Vec<Cidr>,
    /// Outbound destination networks not captured (CIDR or address).
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Only install the IPv4 rules (no ip6tables).
    #[arg(long)]
    pub ipv4_only: bool,
    /// iptables implementation.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Remove Weft's chains and the jumps into them (only those).
    #[arg(long)]
    pub uninstall: bool,
    /// Print the iptables-restore input instead of applying it (needs no privilege).
    #[arg(long)]
    pub dry_run: bool,
}

impl InitArgs {
    /// The capture configuration these options describe.
    pub fn config(&self) -> CaptureConfig {
        CaptureConfig {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            admin_port: self.admin_port,
            dns_port: (!self.no_dns).then_some(self.dns_port),
            proxy_uids: self.proxy_uids.clone(),
            proxy_gids: self.proxy_gids.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_inbound_cidrs: self.exclude_inbound_cidrs.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            ipv6: !self.ipv4_only,
        }
    }

    fn families(&self) -> Vec<Family> {
        if self.ipv4_only {
            vec![Family::V4]
        } else {
            vec![Family::V4, Family::V6]
        }
    }
}

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Bad options.
    #[error("{0}")]
    Invalid(String),
    /// iptables refused or is missing.
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    /// One family was changed and a later one failed.
    #[error("{done} rules were changed, then {family}: {source}")]
    Partial {
        /// What was already applied.
        done: &'static str,
        /// The family that failed.
        family: &'static str,
        /// Why.
        source: IptablesError,
    },
}

/// Runs `init`; returns what to print on stdout.
pub fn run(args: &InitArgs) -> Result<String, InitError> {
    let cfg = args.config();
    if !args.uninstall {
        cfg.validate().map_err(InitError::Invalid)?;
    }
    if args.dry_run {
        return Ok(dry_run(args, &cfg));
    }
    if !has_net_admin() {
        return Err(IptablesError::NoCapability.into());
    }
    let tools: Vec<Tools> = args
        .families()
        .into_iter()
        .map(|f| Tools::locate(args.backend, f))
        .collect::<Result<_, _>>()?;
    let mut report = Vec::new();
    let mut done: Option<&'static str> = None;
    for t in &tools {
        let family = t.family();
        let step = || -> Result<String, IptablesError> {
            let current = t.save_nat()?;
            if args.uninstall {
                match uninstall_script(&current) {
                    None => Ok(format!("{}: no Weft rules installed", family.as_str())),
                    Some(script) => {
                        t.restore(&script)?;
                        let i = parse_save(&current);
                        Ok(format!(
                            "{}: removed chains {} and {} jump(s) into them",
                            family.as_str(),
                            i.chains.join(", "),
                            i.jumps.len()
                        ))
                    }
                }
            } else {
                let replaced = !parse_save(&current).is_empty();
                t.restore(&install_script(&cfg, family, &current))?;
                // Read back: the rules must be there now, exactly once.
                let after = parse_save(&t.save_nat()?);
                let expected = super::rules::chain_rules(&cfg, family).len();
                if after.rules != expected {
                    return Err(IptablesError::Failed {
                        tool: t.save.display().to_string(),
                        status: "check".into(),
                        stderr: format!(
                            "{} rules in Weft's chains after the install, {expected} expected",
                            after.rules
                        ),
                        hint: " (is another backend, nft vs legacy, managing this table?)",
                    });
                }
                Ok(format!(
                    "{}: {} capture rules ({expected} in WEFT_INBOUND/WEFT_OUTPUT)",
                    family.as_str(),
                    if replaced { "replaced" } else { "installed" },
                ))
            }
        };
        match step() {
            Ok(line) => report.push(line),
            Err(source) => {
                return Err(match done {
                    None => source.into(),
                    Some(done) => InitError::Partial {
                        done,
                        family: family.as_str(),
                        source,
                    },
                })
            }
        }
        done = Some(family.as_str());
    }
    if !args.uninstall {
        report.push(summary(&cfg));
    }
    Ok(report.join("\n") + "\n")
}

fn summary(cfg: &CaptureConfig) -> String {
    let mut owners: Vec<String> = cfg.proxy_uids.iter().map(|u| format!("uid {u}")).collect();
    owners.extend(cfg.proxy_gids.iter().map(|g| format!("gid {g}")));
    format!(
        "outbound TCP -> :{}, inbound TCP -> :{}, DNS -> {}; not captured: {}, loopback, inbound ports {}{}{}",
        cfg.outbound_port,
        cfg.inbound_port,
        cfg.dns_port
            .map_or_else(|| "not redirected".to_owned(), |p| format!(":{p}")),
        owners.join(", "),
        [cfg.inbound_port, cfg.admin_port]
            .iter()
            .chain(&cfg.exclude_inbound_ports)
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(","),
        if cfg.exclude_outbound_ports.is_empty() {
            String::new()
        } else {
            format!(
                ", outbound ports {}",
                cfg.exclude_outbound_ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )
        },
        {
            let cidrs: Vec<String> = cfg
                .exclude_inbound_cidrs
                .iter()
                .map(|c| format!("from {c}"))
                .chain(cfg.exclude_outbound_cidrs.iter().map(|c| format!("to {c}")))
                .collect();
            if cidrs.is_empty() {
                String::new()
            } else {
                format!(", {}", cidrs.join(", "))
            }
        }
    )
}

/// The scripts, as they would be applied to a table holding nothing of Weft's (install) or
/// holding the rules of this configuration (uninstall).
fn dry_run(args: &InitArgs, cfg: &CaptureConfig) -> String {
    let mut out = String::new();
    for family in args.families() {
        let tool = match family {
            Family::V4 => "iptables-restore --noflush",
            Family::V6 => "ip6tables-restore --noflush",
        };
        out.push_str(&format!("# {} ({tool})\n", family.as_str()));
        let script = if args.uninstall {
            let installed = install_script(cfg, family, "")
                .lines()
                .filter(|l| !l.starts_with("-D") && !l.starts_with("-X"))
                .collect::<Vec<_>>()
                .join("\n");
            uninstall_script(&installed).unwrap_or_default()
        } else {
            install_script(cfg, family, "")
        };
        out.push_str(&script);
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn parse(args: &[&str]) -> InitArgs {
        Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied()))
            .unwrap()
            .init
    }

    #[test]
    fn dry_run_prints_both_families_without_privilege() {
        let a = parse(&[
            "--proxy-gid",
            "1337",
            "--exclude-inbound-ports",
            "22,2222",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
            "--dry-run",
        ]);
        let out = run(&a).unwrap();
        assert!(
            out.starts_with("# IPv4 (iptables-restore --noflush)\n*nat\n"),
            "{out}"
        );
        assert!(out.contains("# IPv6 (ip6tables-restore --noflush)\n*nat\n"));
        assert!(out.contains("-A WEFT_INBOUND -p tcp --dport 2222 -j RETURN"));
        assert!(out.contains("-A WEFT_OUTPUT -d 10.0.0.0/8 -j RETURN"));
        assert!(out.contains("-A WEFT_OUTPUT -d fd00::/8 -j RETURN"));
        assert_eq!(out.matches("COMMIT").count(), 2);
    }

    #[test]
    fn dry_run_uninstall_lists_the_removal() {
        let out = run(&parse(&["--uninstall", "--dry-run", "--ipv4-only"])).unwrap();
        assert!(!out.contains("IPv6"));
        assert!(out.contains("-D OUTPUT -p tcp -j WEFT_OUTPUT"), "{out}");
        assert!(out.contains("-X WEFT_INBOUND"));
        let no_dns = run(&parse(&["--proxy-uid", "7", "--no-dns", "--dry-run"])).unwrap();
        assert!(!no_dns.contains("--dport 53"));
    }

    #[test]
    fn install_without_an_owner_is_refused_before_anything_runs() {
        let e = run(&parse(&[])).unwrap_err();
        assert!(e.to_string().contains("--proxy-uid"), "{e}");
        let e = run(&parse(&["--proxy-uid", "1", "--dns-port", "15006"])).unwrap_err();
        assert!(e.to_string().contains("--inbound-port"), "{e}");
    }

    #[test]
    fn summary_names_what_is_excluded() {
        let s =
            summary(&parse(&["--proxy-gid", "1337", "--exclude-outbound-ports", "5432"]).config());
        assert!(
            s.contains("gid 1337") && s.contains("outbound ports 5432"),
            "{s}"
        );
        assert!(s.contains("inbound ports 15006,15000"), "{s}");
    }
}

//! The capture rules as `iptables-restore` input: pure functions, no I/O.
//!
//! Weft owns two chains of the `nat` table, in each family (IPv4 with `iptables`, IPv6 with
//! `ip6tables`), and the jumps into them from the built-in chains:
//!
//! ```text
//! PREROUTING -p tcp -j WEFT_INBOUND            (connections arriving at the namespace)
//! OUTPUT     -p tcp -j WEFT_OUTPUT             (connections its processes open)
//! OUTPUT     -p udp --dport 53 -j WEFT_OUTPUT  (DNS queries; when DNS capture is on)
//!
//! WEFT_INBOUND: the inbound port, the admin port, excluded ports and source CIDRs RETURN;
//!               every other TCP connection -> REDIRECT to the inbound port
//! WEFT_OUTPUT:  the proxy's own traffic (--uid-owner / --gid-owner) RETURN;
//!               UDP and TCP to port 53 -> REDIRECT to the DNS port;
//!               loopback (-o lo: 127/8, ::1 and the namespace's own addresses) RETURN;
//!               excluded destination CIDRs and ports RETURN;
//!               every other TCP connection -> REDIRECT to the outbound port
//! ```
//!
//! Installing is one `iptables-restore --noflush` transaction per family
//! ([`install_script`]): it removes every jump into a `WEFT_` chain the table already has,
//! flushes (or creates) Weft's chains, fills them and adds the jumps, so running it twice leaves
//! exactly one copy, and a changed configuration replaces the old rules atomically. Removing
//! ([`uninstall_script`]) deletes exactly the jumps into `WEFT_` chains and those chains; rules
//! of anyone else are never touched.

use super::{CaptureConfig, Cidr};

/// Prefix of every chain Weft owns.
pub const CHAIN_PREFIX: &str = "WEFT_";
/// Chain of connections arriving at the namespace.
pub const INBOUND_CHAIN: &str = "WEFT_INBOUND";
/// Chain of connections (and DNS queries) leaving the namespace's processes.
pub const OUTPUT_CHAIN: &str = "WEFT_OUTPUT";

/// An address family: which tool and which addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

impl Family {
    /// For messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    fn holds(self, c: &Cidr) -> bool {
        c.addr.is_ipv4() == (self == Self::V4)
    }
}

/// One rule: the chain it is appended to and its match/target arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The chain.
    pub chain: &'static str,
    /// Everything after `-A <chain>`.
    pub spec: String,
}

impl Rule {
    fn new(chain: &'static str, spec: impl Into<String>) -> Self {
        Self {
            chain,
            spec: spec.into(),
        }
    }
}

/// The rules of Weft's own chains, in order.
pub fn chain_rules(cfg: &CaptureConfig, family: Family) -> Vec<Rule> {
    let mut out = Vec::new();
    // Inbound: connections to the proxy's own inbound and admin ports are served as they are.
    for port in [cfg.inbound_port, cfg.admin_port]
        .into_iter()
        .chain(cfg.exclude_inbound_ports.iter().copied())
    {
        out.push(Rule::new(
            INBOUND_CHAIN,
            format!("-p tcp --dport {port} -j RETURN"),
        ));
    }
    for c in cfg.exclude_inbound_cidrs.iter().filter(|c| family.holds(c)) {
        out.push(Rule::new(INBOUND_CHAIN, format!("-s {c} -j RETURN")));
    }
    out.push(Rule::new(
        INBOUND_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", cfg.inbound_port),
    ));

    // Outbound: the proxy's own connections first, whatever they are (its DNS forwarder's
    // queries included), so nothing it sends is captured again.
    for uid in &cfg.proxy_uids {
        out.push(Rule::new(
            OUTPUT_CHAIN,
            format!("-m owner --uid-owner {uid} -j RETURN"),
        ));
    }
    for gid in &cfg.proxy_gids {
        out.push(Rule::new(
            OUTPUT_CHAIN,
            format!("-m owner --gid-owner {gid} -j RETURN"),
        ));
    }
    // DNS before the loopback exclusion: a resolver on 127.0.0.53 is still the app's DNS.
    if let Some(dns) = cfg.dns_port {
        for proto in ["udp", "tcp"] {
            out.push(Rule::new(
                OUTPUT_CHAIN,
                format!("-p {proto} --dport 53 -j REDIRECT --to-ports {dns}"),
            ));
        }
    }
    // The app talking to itself (localhost, or its own address) is not mesh traffic.
    out.push(Rule::new(OUTPUT_CHAIN, "-o lo -j RETURN"));
    for c in cfg
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| family.holds(c))
    {
        out.push(Rule::new(OUTPUT_CHAIN, format!("-d {c} -j RETURN")));
    }
    for port in &cfg.exclude_outbound_ports {
        out.push(Rule::new(
            OUTPUT_CHAIN,
            format!("-p tcp --dport {port} -j RETURN"),
        ));
    }
    out.push(Rule::new(
        OUTPUT_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", cfg.outbound_port),
    ));
    out
}

/// The jumps from the built-in chains into Weft's.
pub fn jump_rules(cfg: &CaptureConfig) -> Vec<Rule> {
    let mut out = vec![
        Rule::new("PREROUTING", format!("-p tcp -j {INBOUND_CHAIN}")),
        Rule::new("OUTPUT", format!("-p tcp -j {OUTPUT_CHAIN}")),
    ];
    if cfg.dns_port.is_some() {
        out.push(Rule::new(
            "OUTPUT",
            format!("-p udp --dport 53 -j {OUTPUT_CHAIN}"),
        ));
    }
    out
}

/// What of Weft's is in an `iptables-save -t nat` output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Weft's chains, in the order declared.
    pub chains: Vec<String>,
    /// Rules of other chains that jump into Weft's: `(chain, spec)` as saved.
    pub jumps: Vec<(String, String)>,
    /// Rules inside Weft's chains (for `--dry-run --uninstall` and checks).
    pub rules: usize,
}

impl Installed {
    /// Whether nothing of Weft's is installed.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// Reads the `nat` table of an `iptables-save` output (other tables are ignored).
pub fn parse_save(save: &str) -> Installed {
    let mut out = Installed::default();
    let mut in_nat = false;
    for line in save.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if name.starts_with(CHAIN_PREFIX) {
                out.chains.push(name.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            if chain.starts_with(CHAIN_PREFIX) {
                out.rules += 1;
            } else if jumps_to_weft(spec) {
                out.jumps.push((chain.to_owned(), spec.to_owned()));
            }
        }
    }
    out
}

/// Whether a rule's target (`-j` / `-g`) is one of Weft's chains.
fn jumps_to_weft(spec: &str) -> bool {
    let words: Vec<&str> = spec.split_whitespace().collect();
    words.windows(2).any(|w| {
        matches!(w[0], "-j" | "--jump" | "-g" | "--goto") && w[1].starts_with(CHAIN_PREFIX)
    })
}

/// The `iptables-restore --noflush` input that makes the `nat` table hold exactly Weft's rules
/// for `cfg`, given what `current` (an `iptables-save -t nat` output; "" for none) holds.
pub fn install_script(cfg: &CaptureConfig, family: Family, current: &str) -> String {
    let installed = parse_save(current);
    let ours = [INBOUND_CHAIN, OUTPUT_CHAIN];
    let mut s = String::from("*nat\n");
    // Declaring a chain that exists flushes it (--noflush keeps every other chain as it is).
    for chain in ours {
        s.push_str(&format!(":{chain} - [0:0]\n"));
    }
    let stale: Vec<&String> = installed
        .chains
        .iter()
        .filter(|c| !ours.contains(&c.as_str()))
        .collect();
    for chain in &stale {
        s.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for (chain, spec) in &installed.jumps {
        s.push_str(&format!("-D {chain} {spec}\n"));
    }
    // Chains of an older layout, now empty and unreferenced.
    for chain in &stale {
        s.push_str(&format!("-X {chain}\n"));
    }
    for r in chain_rules(cfg, family).iter().chain(&jump_rules(cfg)) {
        s.push_str(&format!("-A {} {}\n", r.chain, r.spec));
    }
    s.push_str("COMMIT\n");
    s
}

/// The `iptables-restore --noflush` input removing every jump into a Weft chain and the chains,
/// or `None` when `current` holds nothing of Weft's.
pub fn uninstall_script(current: &str) -> Option<String> {
    let installed = parse_save(current);
    if installed.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for (chain, spec) in &installed.jumps {
        s.push_str(&format!("-D {chain} {spec}\n"));
    }
    for chain in &installed.chains {
        s.push_str(&format!("-F {chain}\n"));
    }
    for chain in &installed.chains {
        s.push_str(&format!("-X {chain}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CaptureConfig {
        CaptureConfig {
            proxy_gids: vec![1337],
            ..CaptureConfig::default()
        }
    }

    fn lines(s: &str) -> Vec<&str> {
        s.lines().collect()
    }

    #[test]
    fn default_rules_redirect_and_exclude_in_order() {
        let script = install_script(&cfg(), Family::V4, "");
        assert_eq!(
            lines(&script),
            [
                "*nat",
                ":WEFT_INBOUND - [0:0]",
                ":WEFT_OUTPUT - [0:0]",
                "-A WEFT_INBOUND -p tcp --dport 15006 -j RETURN",
                "-A WEFT_INBOUND -p tcp --dport 15000 -j RETURN",
                "-A WEFT_INBOUND -p tcp -j REDIRECT --to-ports 15006",
                "-A WEFT_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                "-A WEFT_OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053",
                "-A WEFT_OUTPUT -p tcp --dport 53 -j REDIRECT --to-ports 15053",
                "-A WEFT_OUTPUT -o lo -j RETURN",
                "-A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                "-A PREROUTING -p tcp -j WEFT_INBOUND",
                "-A OUTPUT -p tcp -j WEFT_OUTPUT",
                "-A OUTPUT -p udp --dport 53 -j WEFT_OUTPUT",
                "COMMIT",
            ]
        );
    }

    #[test]
    fn exclusions_are_per_family_and_before_the_redirects() {
        let c = CaptureConfig {
            proxy_uids: vec![1337],
            proxy_gids: vec![1338],
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![5432],
            exclude_inbound_cidrs: vec![
                "10.1.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            exclude_outbound_cidrs: vec![
                "169.254.169.254".parse().unwrap(),
                "::1".parse().unwrap(),
            ],
            dns_port: None,
            ..CaptureConfig::default()
        };
        let v4 = install_script(&c, Family::V4, "");
        let v6 = install_script(&c, Family::V6, "");
        for needed in [
            "-A WEFT_INBOUND -p tcp --dport 22 -j RETURN",
            "-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A WEFT_OUTPUT -m owner --gid-owner 1338 -j RETURN",
            "-A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN",
        ] {
            assert!(v4.contains(needed) && v6.contains(needed), "{needed}");
        }
        assert!(v4.contains("-A WEFT_INBOUND -s 10.1.0.0/16 -j RETURN"));
        assert!(v4.contains("-A WEFT_OUTPUT -d 169.254.169.254/32 -j RETURN"));
        assert!(!v4.contains("fd00") && !v4.contains("::1"));
        assert!(v6.contains("-A WEFT_INBOUND -s fd00::/8 -j RETURN"));
        assert!(v6.contains("-A WEFT_OUTPUT -d ::1/128 -j RETURN"));
        assert!(!v6.contains("10.1.0.0") && !v6.contains("169.254"));
        // No DNS capture: no port-53 rules and no UDP jump.
        assert!(!v4.contains("--dport 53 ") && !v4.contains("-p udp"));
        // Every RETURN of a chain comes before its REDIRECT (first match wins).
        for script in [&v4, &v6] {
            for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
                let rules: Vec<&str> = script
                    .lines()
                    .filter(|l| l.starts_with(&format!("-A {chain} ")))
                    .collect();
                let last = rules.last().unwrap();
                assert!(last.contains("REDIRECT"), "{last}");
                assert!(rules[..rules.len() - 1]
                    .iter()
                    .all(|r| r.ends_with("RETURN")));
            }
        }
    }

    /// What `iptables-save -t nat` prints after our install (it normalizes `-m udp`).
    const SAVED: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:WEFT_INBOUND - [0:0]
:WEFT_OUTPUT - [0:0]
:WEFT_OLD - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -p tcp -j WEFT_INBOUND
-A OUTPUT -p tcp -j WEFT_OUTPUT
-A OUTPUT -p udp -m udp --dport 53 -j WEFT_OUTPUT
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -g WEFT_OLD
-A WEFT_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j WEFT_FILTER
COMMIT
";

    #[test]
    fn parse_finds_only_our_chains_and_jumps_in_nat() {
        let i = parse_save(SAVED);
        assert_eq!(i.chains, ["WEFT_INBOUND", "WEFT_OUTPUT", "WEFT_OLD"]);
        assert_eq!(
            i.jumps,
            [
                ("PREROUTING".to_owned(), "-p tcp -j WEFT_INBOUND".to_owned()),
                ("OUTPUT".to_owned(), "-p tcp -j WEFT_OUTPUT".to_owned()),
                (
                    "OUTPUT".to_owned(),
                    "-p udp -m udp --dport 53 -j WEFT_OUTPUT".to_owned()
                ),
                ("DOCKER".to_owned(), "-g WEFT_OLD".to_owned()),
            ]
        );
        assert_eq!(i.rules, 2);
        assert!(parse_save("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").is_empty());
        // A chain merely named like a target is not a jump.
        assert!(
            parse_save("*nat\n-A OUTPUT -m comment --comment WEFT_X -j ACCEPT\n")
                .jumps
                .is_empty()
        );
    }

    #[test]
    fn reinstall_replaces_jumps_and_drops_stale_chains() {
        let script = install_script(&cfg(), Family::V4, SAVED);
        let l = lines(&script);
        // Old jumps deleted before anything is added; stale chain flushed then removed.
        let pos = |s: &str| {
            l.iter()
                .position(|x| *x == s)
                .unwrap_or_else(|| panic!("{s}"))
        };
        assert!(pos(":WEFT_OLD - [0:0]") < pos("-D DOCKER -g WEFT_OLD"));
        assert!(pos("-D DOCKER -g WEFT_OLD") < pos("-X WEFT_OLD"));
        assert!(
            pos("-D OUTPUT -p udp -m udp --dport 53 -j WEFT_OUTPUT")
                < pos("-A OUTPUT -p udp --dport 53 -j WEFT_OUTPUT")
        );
        assert_eq!(
            l.iter().filter(|x| x.starts_with("-A PREROUTING")).count(),
            1
        );
        // Docker's rules are untouched.
        assert!(!script.contains("MASQUERADE") && !script.contains("addrtype"));
    }

    #[test]
    fn uninstall_removes_exactly_ours() {
        let script = uninstall_script(SAVED).unwrap();
        assert_eq!(
            lines(&script),
            [
                "*nat",
                "-D PREROUTING -p tcp -j WEFT_INBOUND",
                "-D OUTPUT -p tcp -j WEFT_OUTPUT",
                "-D OUTPUT -p udp -m udp --dport 53 -j WEFT_OUTPUT",
                "-D DOCKER -g WEFT_OLD",
                "-F WEFT_INBOUND",
                "-F WEFT_OUTPUT",
                "-F WEFT_OLD",
                "-X WEFT_INBOUND",
                "-X WEFT_OUTPUT",
                "-X WEFT_OLD",
                "COMMIT",
            ]
        );
        assert_eq!(uninstall_script("*nat\nCOMMIT\n"), None);
        assert_eq!(uninstall_script(""), None);
    }

    #[test]
    fn validation_needs_an_owner_and_distinct_ports() {
        assert!(CaptureConfig::default()
            .validate()
            .unwrap_err()
            .contains("--proxy-uid"));
        assert!(cfg().validate().is_ok());
        let clash = CaptureConfig {
            dns_port: Some(15001),
            ..cfg()
        };
        assert!(clash.validate().unwrap_err().contains("--outbound-port"));
        let zero = CaptureConfig {
            admin_port: 0,
            ..cfg()
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn cidrs_parse_and_print() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().to_string(), "1.2.3.4/32");
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }
}

//! Runs the `iptables` tools: reads the `nat` table with `*-save`, applies a script with
//! `*-restore --noflush` (one transaction per family), and explains failures.
//!
//! Backend: the nf_tables one (`iptables-nft-*`, Debian's default `iptables` alternative) unless
//! `--backend legacy` asks for `iptables-legacy-*`; both come with Debian's `iptables` package.
//! `auto` takes the nft tools when they exist and the plain `iptables-save`/`-restore` otherwise.
//! Rules of the two backends live in different kernel tables, so one namespace should use one.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::rules::Family;

/// Which iptables implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// nf_tables if its tools are installed, else the system's `iptables-save`/`-restore`.
    Auto,
    /// `iptables-nft-save` / `iptables-nft-restore` (and `ip6tables-nft-*`).
    Nft,
    /// `iptables-legacy-save` / `iptables-legacy-restore` (x_tables).
    Legacy,
}

/// Why the rules could not be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The process lacks CAP_NET_ADMIN: nothing was tried.
    #[error(
        "changing this network namespace's iptables rules needs CAP_NET_ADMIN, which this process \
         does not have: run `weft-proxy init` as root, or give it the NET_ADMIN capability (e.g. a \
         Kubernetes init container with `securityContext.capabilities.add: [NET_ADMIN, NET_RAW]`, \
         `docker run --cap-add NET_ADMIN`)"
    )]
    NoCapability,
    /// A tool is missing.
    #[error("{tool} not found (looked in PATH, /usr/sbin, /sbin): install the Debian package `iptables` (apt-get install iptables)")]
    Missing {
        /// The executable.
        tool: String,
    },
    /// A tool ran and failed.
    #[error("{tool} failed ({status}): {stderr}{hint}")]
    Failed {
        /// The executable.
        tool: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
        /// What to do about it, when recognisable.
        hint: &'static str,
    },
    /// Spawning or talking to a tool failed.
    #[error("running {tool}: {source}")]
    Io {
        /// The executable.
        tool: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The save/restore pair of one family.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `iptables-nft-save` or the like.
    pub save: PathBuf,
    /// `iptables-nft-restore` or the like.
    pub restore: PathBuf,
    family: Family,
}

/// Where a tool is: PATH, then /usr/sbin and /sbin (a non-root PATH often lacks them).
fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Tools {
    /// The tools of `family` for `backend`.
    pub fn locate(backend: Backend, family: Family) -> Result<Self, IptablesError> {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let pick = |infix: &str| -> Result<(PathBuf, PathBuf), IptablesError> {
            let names = [
                format!("{base}{infix}-save"),
                format!("{base}{infix}-restore"),
            ];
            let mut found = Vec::new();
            for n in names {
                found.push(find(&n).ok_or(IptablesError::Missing { tool: n })?);
            }
            let restore = found.pop().unwrap_or_default();
            let save = found.pop().unwrap_or_default();
            Ok((save, restore))
        };
        let (save, restore) = match backend {
            Backend::Nft => pick("-nft")?,
            Backend::Legacy => pick("-legacy")?,
            Backend::Auto => pick("-nft").or_else(|_| pick(""))?,
        };
        Ok(Self {
            save,
            restore,
            family,
        })
    }

    /// The family these tools handle.
    pub fn family(&self) -> Family {
        self.family
    }

    /// `*-save -t nat`.
    pub fn save_nat(&self) -> Result<String, IptablesError> {
        let out = Command::new(&self.save)
            .args(["-t", "nat"])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| self.io(&self.save, source))?;
        if !out.status.success() {
            return Err(failed(&self.save, &out.status, &out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `*-restore --noflush` with `script` on stdin: one transaction.
    pub fn restore(&self, script: &str) -> Result<(), IptablesError> {
        let mut child = Command::new(&self.restore)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| self.io(&self.restore, source))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|source| self.io(&self.restore, source))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|source| self.io(&self.restore, source))?;
        if !out.status.success() {
            return Err(failed(&self.restore, &out.status, &out.stderr));
        }
        Ok(())
    }

    fn io(&self, tool: &Path, source: std::io::Error) -> IptablesError {
        IptablesError::Io {
            tool: tool.display().to_string(),
            source,
        }
    }
}

fn failed(tool: &Path, status: &std::process::ExitStatus, stderr: &[u8]) -> IptablesError {
    let stderr = String::from_utf8_lossy(stderr).trim().to_owned();
    let lower = stderr.to_ascii_lowercase();
    let hint = if lower.contains("permission denied") || lower.contains("operation not permitted") {
        " (this needs CAP_NET_ADMIN in the network namespace: run as root or with NET_ADMIN)"
    } else if lower.contains("table does not exist") || lower.contains("can't initialize") {
        " (the kernel lacks the nat table for this family: load ip_tables/ip6table_nat (legacy) \
         or nf_tables + nft_chain_nat, or pass --ipv4-only when IPv6 is not used)"
    } else if lower.contains("no chain/target/match") || lower.contains("couldn't load") {
        " (a match or target is missing in the kernel: REDIRECT and owner need xt_REDIRECT / \
         xt_owner, or their nft_compat equivalents)"
    } else {
        ""
    };
    IptablesError::Failed {
        tool: tool.display().to_string(),
        status: status.to_string(),
        stderr,
        hint,
    }
}

/// CAP_NET_ADMIN's bit in the capability sets (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

/// Whether this process has CAP_NET_ADMIN in its effective set (`/proc/self/status` `CapEff`);
/// `true` when that cannot be read (the tools then give their own error).
pub fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status").map_or(true, |s| cap_eff_has(&s, CAP_NET_ADMIN))
}

fn cap_eff_has(status: &str, bit: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|caps| caps & (1u64 << bit) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_bits_are_read_from_cap_eff() {
        let root = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert!(cap_eff_has(root, CAP_NET_ADMIN));
        let user = "CapEff:\t0000000000000000\n";
        assert!(!cap_eff_has(user, CAP_NET_ADMIN));
        // NET_ADMIN alone (bit 12 = 0x1000).
        assert!(cap_eff_has("CapEff:\t0000000000001000\n", CAP_NET_ADMIN));
        assert!(!cap_eff_has("CapEff:\t0000000000002000\n", CAP_NET_ADMIN));
        // Unreadable: let the tools decide.
        assert!(cap_eff_has("nothing here", CAP_NET_ADMIN));
    }

    #[test]
    fn failures_explain_themselves() {
        use std::os::unix::process::ExitStatusExt as _;
        let status = std::process::ExitStatus::from_raw(1 << 8);
        let e = failed(
            Path::new("/usr/sbin/iptables-nft-restore"),
            &status,
            b"iptables-nft-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n",
        );
        let msg = e.to_string();
        assert!(
            msg.contains("CAP_NET_ADMIN") && msg.contains("Permission denied"),
            "{msg}"
        );
        let e = failed(
            Path::new("ip6tables-restore"),
            &status,
            b"ip6tables-restore: line 2 failed: table does not exist",
        );
        assert!(e.to_string().contains("--ipv4-only"), "{e}");
        let e = IptablesError::Missing {
            tool: "iptables-nft-restore".into(),
        };
        assert!(e.to_string().contains("apt-get install iptables"));
    }
}

//! Several `weft-control` replicas sharing one etcd cluster (`--store etcd`), and proxies that
//! fail over between them: the shared parts of a mesh (etcd, the one CA directory every replica
//! uses), replicas named `cp-1`, `cp-2`, ..., proxy bootstraps listing the replicas in a chosen
//! order, and a mount namespace with its own `/etc/hosts` for a DNS name with several
//! addresses.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::{duration_arg, ControlPlane, ControlPlaneConfig};
use crate::etcd::Etcd;
use crate::policy::PolicyDir;
use crate::proxy::ProxyConfig;
use crate::wait::{wait_until, DEFAULT_WAIT};

/// The etcd lease TTL of test replicas (the binary's default is 10 s).
pub const LEASE_TTL: Duration = Duration::from_secs(2);

/// A mesh's shared parts: etcd, the CA directory of every replica, an (unused) policy directory
/// (replicas on etcd read no directory) and a directory for files to `weftctl apply`.
#[derive(Debug)]
pub struct Mesh {
    pub etcd: Etcd,
    ca: tempfile::TempDir,
    policies: PolicyDir,
    files: tempfile::TempDir,
    /// `--deregister-grace` of the replicas started from now on.
    pub deregister_grace: Duration,
    /// `--etcd-lease-ttl` of the replicas started from now on ([`LEASE_TTL`] unless changed).
    pub lease_ttl: Duration,
}

impl Mesh {
    /// A mesh on an etcd cluster of `members` members, every one healthy.
    pub async fn start(members: usize) -> Mesh {
        Mesh {
            etcd: Etcd::start_cluster(members).await,
            ca: tempfile::Builder::new()
                .prefix("weft-mesh-ca-")
                .tempdir()
                .unwrap_or_else(|e| panic!("cannot create the mesh's CA dir: {e}")),
            policies: PolicyDir::new(),
            files: tempfile::Builder::new()
                .prefix("weft-mesh-files-")
                .tempdir()
                .unwrap_or_else(|e| panic!("cannot create a dir for policy files: {e}")),
            deregister_grace: ControlPlaneConfig::new(Path::new("")).deregister_grace,
            lease_ttl: LEASE_TTL,
        }
    }

    /// The CA directory every replica shares.
    pub fn ca_dir(&self) -> &Path {
        self.ca.path()
    }

    /// The config of replica `name` (`--replica-id`) on this mesh's etcd, lease TTL
    /// [`Mesh::lease_ttl`], etcd requests limited to 2 s.
    pub fn config(&self, name: &str) -> ControlPlaneConfig {
        let mut config = ControlPlaneConfig::new(self.policies.path());
        config.ca_dir = Some(self.ca.path().to_path_buf());
        config.deregister_grace = self.deregister_grace;
        config.extra_args = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &self.etcd.endpoints(),
            "--etcd-lease-ttl",
            &duration_arg(self.lease_ttl),
            "--etcd-timeout",
            "2s",
            "--replica-id",
            name,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        config
    }

    /// Starts replica `name`.
    pub async fn replica(&self, name: &str) -> ControlPlane {
        ControlPlane::start_with(self.config(name)).await
    }

    /// Starts replicas `cp-1` ..= `cp-<n>`, one after the other.
    pub async fn replicas(&self, n: usize) -> Vec<ControlPlane> {
        let mut out = Vec::with_capacity(n);
        for i in 1..=n {
            out.push(self.replica(&format!("cp-{i}")).await);
        }
        out
    }

    /// Writes `yaml` to a file named `name` for `weftctl apply -f`; returns its path.
    pub fn file(&self, name: &str, yaml: &str) -> String {
        let path = self.files.path().join(name);
        std::fs::write(&path, yaml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path.display().to_string()
    }
}

/// A proxy bootstrap listing the replicas in `order` (`control_plane: [first, ...]`): the
/// proxy connects to the first it can reach and moves down the list when it loses it.
pub fn failover_config(
    order: &[&ControlPlane],
    service: &str,
    id: &str,
    app: SocketAddr,
) -> ProxyConfig {
    let (first, rest) = order
        .split_first()
        .unwrap_or_else(|| panic!("a failover bootstrap needs at least one replica"));
    let mut config = ProxyConfig::new(&first.grpc_url(), service, id, app);
    config.control_plane_replicas = rest.iter().map(|cp| cp.grpc_url()).collect();
    config
}

/// `GET /v1/policies` of `cp`: (version, revision).
pub async fn served(cp: &ControlPlane) -> (String, Option<i64>) {
    let p = cp.policies().await;
    (
        p["version"].as_str().unwrap_or_default().to_owned(),
        p["revision"].as_i64(),
    )
}

/// Waits until `cp` and `reference` serve the same policies at the same revision.
pub async fn wait_same_policies(cp: &ControlPlane, reference: &ControlPlane) {
    wait_until(
        DEFAULT_WAIT,
        &format!(
            "the replicas at {} and {} serve the same policy revision",
            cp.admin_addr, reference.admin_addr
        ),
        async || {
            let (got, want) = (served(cp).await, served(reference).await);
            if got == want && want.1.is_some() {
                Ok(())
            } else {
                Err(format!("{got:?} and {want:?}"))
            }
        },
    )
    .await;
}

/// A port free on every one of `ips` a moment ago (replicas behind one DNS name listen on the
/// same port at different addresses).
pub fn free_port_on_all(ips: &[IpAddr]) -> u16 {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind((ips[0], 0))
            .unwrap_or_else(|e| panic!("cannot bind {}:0: {e}", ips[0]));
        let port = first
            .local_addr()
            .unwrap_or_else(|e| panic!("no local address: {e}"))
            .port();
        let others: Vec<_> = ips[1..]
            .iter()
            .map(|ip| std::net::TcpListener::bind((*ip, port)))
            .collect();
        if others.iter().all(Result::is_ok) {
            return port;
        }
    }
    panic!("no port free on every one of {ips:?} in 50 tries");
}

/// An `/etc/hosts` for a proxy of its own: `name` resolves to every address of `ips`, in that
/// order (written in `dir`; see [`with_hosts_file`]).
pub fn hosts_file(dir: &Path, name: &str, ips: &[IpAddr]) -> PathBuf {
    let mut text = String::from("127.0.0.1 localhost\n");
    for ip in ips {
        text.push_str(&format!("{ip} {name}\n"));
    }
    let path = dir.join("hosts");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// Runs the proxy of `config` in a mount namespace of its own (`unshare --mount`, private
/// propagation: nothing leaks to the host) where `hosts` is bind-mounted over `/etc/hosts`:
/// its system resolver sees the test's names, the rest of the machine does not. Needs root.
pub fn with_hosts_file(config: &mut ProxyConfig, hosts: &Path) {
    config.command_prefix = vec![
        "unshare".to_owned(),
        "--mount".to_owned(),
        "--propagation".to_owned(),
        "private".to_owned(),
        "sh".to_owned(),
        "-c".to_owned(),
        // $0 is the proxy binary, "$@" its arguments: exec keeps the PID the guard stops.
        format!(
            "mount --bind '{}' /etc/hosts && exec \"$0\" \"$@\"",
            hosts.display()
        ),
    ];
}

/// Stops (SIGSTOP) process `pid`: it holds its sockets but answers nothing until
/// [`resume`]d.
pub fn pause(pid: u32) {
    signal(pid, rustix::process::Signal::STOP);
}

/// Resumes (SIGCONT) a process [`pause`]d.
pub fn resume(pid: u32) {
    signal(pid, rustix::process::Signal::CONT);
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let p = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .unwrap_or_else(|| panic!("{pid} is not a PID"));
    rustix::process::kill_process(p, sig).unwrap_or_else(|e| panic!("kill -{sig:?} {pid}: {e}"));
}

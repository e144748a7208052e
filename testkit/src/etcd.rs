//! A real etcd (Debian's `etcd-server`, installed by `scripts/install-test-deps.sh`) started by a
//! test: each member on its own loopback IP with free ports and a temporary data directory,
//! healthy once its `/health` endpoint says so, stopped (or killed) by PID, restartable on the
//! same data and ports. [`Etcd::etcdctl`] runs etcd's own client against it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::http::http_get;
use crate::net::{free_addrs, next_loopback_ip};
use crate::process::ProcessGuard;
use crate::wait::{wait_until, DEFAULT_WAIT};

/// `name` on PATH or in /usr/bin, else a panic saying what to install.
fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` not found: install etcd-server and etcd-client (scripts/install-test-deps.sh)"
        )
    })
}

/// One etcd member.
#[derive(Debug)]
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    process: Option<ProcessGuard>,
}

/// An etcd cluster of one or more members on loopback.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<Member>,
    token: String,
    /// Holds every member's data directory (`<name>.etcd`).
    data: tempfile::TempDir,
}

impl Etcd {
    /// One member, healthy.
    pub async fn start() -> Etcd {
        Etcd::start_cluster(1).await
    }

    /// `n` members forming one cluster, every one healthy.
    pub async fn start_cluster(n: usize) -> Etcd {
        assert!(n >= 1, "an etcd cluster has at least one member");
        let data = tempfile::Builder::new()
            .prefix("weft-etcd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create etcd's data directory: {e}"));
        let members = (0..n)
            .map(|i| {
                let ip = next_loopback_ip();
                let addrs = free_addrs(ip, 2);
                Member {
                    name: format!("m{i}"),
                    client: addrs[0],
                    peer: addrs[1],
                    process: None,
                }
            })
            .collect();
        let mut etcd = Etcd {
            members,
            token: format!("weft-test-{}-{}", std::process::id(), rand_suffix()),
            data,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        for i in 0..n {
            etcd.wait_healthy(i).await;
        }
        etcd
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The data directory of member `i`.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.data
            .path()
            .join(format!("{}.etcd", self.members[i].name))
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = self.initial_cluster();
        let data_dir = self.data_dir(i);
        let m = &mut self.members[i];
        let mut cmd = Command::new(tool("etcd"));
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn");
        m.process = Some(ProcessGuard::spawn(&format!("etcd-{}", m.name), cmd));
    }

    /// Waits until member `i` answers `GET /health` with `"health":"true"`.
    pub async fn wait_healthy(&mut self, i: usize) {
        let url = format!("http://{}/health", self.members[i].client);
        let process = self.members[i]
            .process
            .as_mut()
            .unwrap_or_else(|| panic!("etcd member {i} is not running"));
        wait_until(
            DEFAULT_WAIT,
            &format!("etcd at {url} is healthy"),
            async || {
                if let Some(status) = process.try_exit_status() {
                    panic!(
                        "etcd exited ({status}) before it was healthy\n{}",
                        process.describe()
                    );
                }
                match http_get(&url).await {
                    Ok(r) if r.status == 200 && r.text().contains("\"health\":\"true\"") => Ok(()),
                    Ok(r) => Err(format!("GET {url}: {}", r.text())),
                    Err(e) => Err(format!("GET {url}: {e:#}")),
                }
            },
        )
        .await;
    }

    /// `http://ip:port,...`: the client URLs of every member (the `--etcd-endpoints` value).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.members[i].client)
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Stops member `i` (SIGTERM, then SIGKILL), keeping its data.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.stop();
        }
    }

    /// Kills member `i` (SIGKILL: a crash), keeping its data.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill();
        }
    }

    /// Stops every member.
    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }

    /// Starts member `i` again on its data and ports (it must be stopped) and waits until it is
    /// healthy (a lone member of a larger cluster is healthy only once a quorum runs: use
    /// [`Etcd::restart_all`] for a full restart).
    pub async fn restart(&mut self, i: usize) {
        assert!(
            self.members[i].process.is_none(),
            "etcd member {i} is running"
        );
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// Starts every stopped member again, then waits until all are healthy.
    pub async fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].process.is_none() {
                self.spawn(i);
            }
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i).await;
        }
    }

    /// Runs `etcdctl` (API v3) against every member, with `args`; waits at most 10 s.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(tool("etcdctl"));
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoints().replace("http://", ""))
            .arg("--command-timeout=10s")
            .args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run etcdctl {args:?}: {e}"))
    }

    /// The keys under `prefix` (`etcdctl get --prefix --keys-only`); panics if etcdctl fails.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.etcdctl(&["get", "--prefix", "--keys-only", prefix]);
        assert!(
            out.status.success(),
            "etcdctl get --prefix --keys-only {prefix}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The value of `key` (`etcdctl get --print-value-only`), `None` when absent.
    pub fn value(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", "--print-value-only", key]);
        assert!(
            out.status.success(),
            "etcdctl get {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // etcdctl ends the value with a newline of its own.
        let value = text.strip_suffix('\n').unwrap_or(&text);
        (!text.is_empty()).then(|| value.to_owned())
    }

    /// Whether member `i` runs (it was not stopped or killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].process.is_some()
    }

    /// The member that leads the cluster now, by `etcdctl endpoint status` of each running
    /// member (the one whose own id is the leader it reports); `None` while there is none (an
    /// election, a lost quorum).
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len())
            .filter(|i| self.is_running(*i))
            .find(|i| {
                let out = Command::new(tool("etcdctl"))
                    .env("ETCDCTL_API", "3")
                    .arg("--endpoints")
                    .arg(self.members[*i].client.to_string())
                    .args(["--command-timeout=3s", "endpoint", "status", "-w", "json"])
                    .output();
                let Some(out) = out.ok().filter(|o| o.status.success()) else {
                    return false;
                };
                let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                    return false;
                };
                let s = &status[0]["Status"];
                let (me, leader) = (s["header"]["member_id"].as_u64(), s["leader"].as_u64());
                me.is_some() && me == leader
            })
    }

    /// Waits until the running members elected a leader; returns it.
    pub async fn wait_leader(&self) -> usize {
        wait_until(
            DEFAULT_WAIT,
            "the etcd members elected a leader",
            async || self.leader().ok_or("no leader yet"),
        )
        .await
    }

    /// The directory holding every member's data.
    pub fn data_root(&self) -> &Path {
        self.data.path()
    }
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

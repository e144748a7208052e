//! The control-plane replicas under test: started by the run (`weft-control` from the bin
//! directory, one replica with a policy directory or several on etcd) or given (attach mode),
//! and reached through their admin API: `/healthz`, `/v1/policies`, `/metrics` with the
//! bootstrap admin token of the shared CA directory, and `weftctl apply`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::Method;
use weft_control::ctl::auth::Credentials;
use weft_control::ctl::AdminClient;

use crate::procs::{free_addrs, Guard};

/// One control-plane replica.
pub struct Replica {
    pub name: String,
    /// `https://ip:port` of its gRPC port.
    pub grpc_url: String,
    /// `https://ip:port` of its admin API.
    pub admin_url: String,
    /// The process, when this run started it.
    pub process: Option<Guard>,
    admin: AdminClient,
}

/// How to start replicas.
pub struct StartSpec<'a> {
    pub bin_dir: &'a Path,
    pub work: &'a Path,
    pub ca_dir: &'a Path,
    /// `None`: one replica on a policy directory; `Some(urls)`: replicas on etcd.
    pub etcd: Option<&'a [String]>,
    pub replicas: usize,
    /// Raised `--max-*` caps: total and per service.
    pub max_registrations: usize,
    pub max_per_service: usize,
    /// More `weft-control` arguments, appended as given.
    pub extra_args: &'a [String],
}

impl Replica {
    /// A replica someone else started.
    pub fn attach(
        name: String,
        grpc_url: String,
        admin_url: String,
        ca_dir: &Path,
    ) -> anyhow::Result<Replica> {
        let admin = admin_client(&admin_url, ca_dir)?;
        Ok(Replica {
            name,
            grpc_url,
            admin_url,
            process: None,
            admin,
        })
    }

    /// Starts the replicas (the first alone, so it creates the CA the others load) and waits
    /// until each answers `/healthz`.
    pub async fn start_all(spec: &StartSpec<'_>) -> anyhow::Result<Vec<Replica>> {
        let mut out = Vec::new();
        for i in 0..spec.replicas {
            let ip = format!("127.0.5.{}", i + 1);
            let addrs = free_addrs(&ip, 2)?;
            let name = format!("cp-{}", i + 1);
            let bin = spec.bin_dir.join("weft-control");
            anyhow::ensure!(
                bin.is_file(),
                "{} not found: build it (cargo build --release -p weft-control) or pass --bin-dir",
                bin.display()
            );
            let mut cmd = Command::new(bin);
            cmd.arg("--grpc")
                .arg(addrs[0].to_string())
                .arg("--admin")
                .arg(addrs[1].to_string())
                .arg("--ca-dir")
                .arg(spec.ca_dir)
                .arg("--max-registrations")
                .arg(spec.max_registrations.to_string())
                .arg("--max-registrations-per-service")
                .arg(spec.max_per_service.to_string());
            match spec.etcd {
                None => {
                    let policies = spec.work.join("policies");
                    std::fs::create_dir_all(&policies)?;
                    cmd.arg("--policies").arg(policies);
                }
                Some(urls) => {
                    cmd.arg("--store")
                        .arg("etcd")
                        .arg("--etcd-endpoints")
                        .arg(urls.join(","))
                        .arg("--replica-id")
                        .arg(&name);
                }
            }
            cmd.args(spec.extra_args);
            let guard = Guard::spawn(&name, cmd, &spec.work.join(format!("{name}.log")))?;
            let replica = Replica {
                grpc_url: format!("https://{}", addrs[0]),
                admin_url: format!("https://{}", addrs[1]),
                name,
                process: Some(guard),
                // Built once the CA directory holds roots.pem and the admin token.
                admin: AdminClient::new("http://127.0.0.1:1")?,
            };
            out.push(replica);
            let last = out.len() - 1;
            out[last].wait_healthy(spec.ca_dir).await?;
        }
        Ok(out)
    }

    async fn wait_healthy(&mut self, ca_dir: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(p) = &mut self.process {
                p.check_running()?;
            }
            if ca_dir.join("roots.pem").exists() && ca_dir.join("admin-token").exists() {
                self.admin = admin_client(&self.admin_url, ca_dir)?;
                match self.admin.send(Method::GET, "/healthz", None).await {
                    Ok(r) if r.status == 200 => return Ok(()),
                    Ok(r) => last = format!("{}: {}", r.status, r.text()),
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("{} never answered /healthz within 90s: {last}", self.name)
    }

    /// `GET path` expecting 200: the body.
    pub async fn get(&self, path: &str) -> anyhow::Result<String> {
        let r = self.admin.send(Method::GET, path, None).await?;
        anyhow::ensure!(
            r.status == 200,
            "GET {}{path}: {}: {}",
            self.admin_url,
            r.status,
            r.text()
        );
        Ok(r.text())
    }

    /// The policy version this replica serves.
    pub async fn policy_version(&self) -> anyhow::Result<String> {
        let body = self.get("/v1/policies").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["version"].as_str().unwrap_or_default().to_owned())
    }

    /// This replica's `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        Ok(Metrics(self.get("/metrics").await?))
    }

    /// `weftctl apply -f path` through this replica; fails with weftctl's output unless it
    /// exits 0. Bounded by 120 s.
    pub async fn weftctl_apply(
        &self,
        bin_dir: &Path,
        ca_dir: &Path,
        path: &Path,
    ) -> anyhow::Result<()> {
        let bin = weftctl_path(bin_dir)?;
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("--server")
            .arg(&self.admin_url)
            .arg("--ca-dir")
            .arg(ca_dir)
            .arg("apply")
            .arg("-f")
            .arg(path)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .context("weftctl apply did not finish within 120s")?
            .with_context(|| format!("running {}", bin.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "weftctl apply -f {} exited {}: {}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

fn weftctl_path(bin_dir: &Path) -> anyhow::Result<PathBuf> {
    let bin = bin_dir.join("weftctl");
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build it (cargo build --release -p weft-control) or pass --bin-dir",
        bin.display()
    );
    Ok(bin)
}

fn admin_client(admin_url: &str, ca_dir: &Path) -> anyhow::Result<AdminClient> {
    let credentials = Credentials {
        ca_dir: Some(ca_dir.to_path_buf()),
        ..Credentials::default()
    };
    Ok(AdminClient::with_credentials(admin_url, &credentials)?)
}

/// A `/metrics` text.
#[derive(Debug, Clone, Default)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample `name` (with exactly `labels`, e.g. `result="compiled"`; "" = no
    /// labels); 0 when absent.
    pub fn value(&self, name: &str, labels: &str) -> f64 {
        let key = if labels.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{labels}}}")
        };
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == key).then(|| v.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_by_name_and_labels() {
        let m = Metrics(
            "# HELP x\nweft_control_compilations_total{result=\"compiled\"} 12\nweft_control_compilations_total{result=\"reused\"} 3400\nweft_control_pushes_pending 0\n"
                .into(),
        );
        assert_eq!(
            m.value("weft_control_compilations_total", "result=\"compiled\""),
            12.0
        );
        assert_eq!(
            m.value("weft_control_compilations_total", "result=\"reused\""),
            3400.0
        );
        assert_eq!(m.value("weft_control_pushes_pending", ""), 0.0);
        assert_eq!(m.value("absent", ""), 0.0);
    }
}

//! Starting `weft-demo-app`, the upstream the tests send traffic to.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use crate::bin_path;
use crate::http::http_get;
use crate::net::{free_addr, next_loopback_ip};
use crate::process::ProcessGuard;
use crate::wait::{wait_until, DEFAULT_WAIT};

/// The demo app's command line.
#[derive(Clone, Debug)]
pub struct DemoAppConfig {
    /// `--name`: the service it reports.
    pub name: String,
    /// `--instance`: reported in bodies and the `x-demo-instance` header.
    pub instance: String,
    pub http: SocketAddr,
    pub grpc: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    /// `--outbound`: the sidecar outbound listener `/call` sends through.
    pub outbound: Option<SocketAddr>,
}

impl DemoAppConfig {
    /// HTTP only, on a fresh loopback IP.
    pub fn new(name: &str, instance: &str) -> Self {
        DemoAppConfig::on_ip(next_loopback_ip(), name, instance)
    }

    /// HTTP only, on `ip`.
    pub fn on_ip(ip: IpAddr, name: &str, instance: &str) -> Self {
        DemoAppConfig {
            name: name.to_string(),
            instance: instance.to_string(),
            http: free_addr(ip),
            grpc: None,
            tcp: None,
            outbound: None,
        }
    }

    /// Also serve gRPC (`weft.demo.v1.Echo`) on a free port of the same IP.
    pub fn with_grpc(mut self) -> Self {
        self.grpc = Some(self.another_free_addr());
        self
    }

    /// Also run the TCP echo server on a free port of the same IP.
    pub fn with_tcp(mut self) -> Self {
        self.tcp = Some(self.another_free_addr());
        self
    }

    /// The same listeners on fresh free ports of the same IP.
    fn with_fresh_ports(self) -> Self {
        let (grpc, tcp) = (self.grpc.is_some(), self.tcp.is_some());
        let mut fresh = DemoAppConfig {
            http: free_addr(self.http.ip()),
            grpc: None,
            tcp: None,
            ..self
        };
        if grpc {
            fresh = fresh.with_grpc();
        }
        if tcp {
            fresh = fresh.with_tcp();
        }
        fresh
    }

    /// A free port on the app's IP that none of its other listeners was given (a released
    /// port-0 pick can come back on the next pick).
    fn another_free_addr(&self) -> SocketAddr {
        let taken = [Some(self.http), self.grpc, self.tcp];
        loop {
            let addr = free_addr(self.http.ip());
            if !taken.contains(&Some(addr)) {
                return addr;
            }
        }
    }

    /// Send `/call` requests through `outbound` (a sidecar's outbound listener).
    pub fn with_outbound(mut self, outbound: SocketAddr) -> Self {
        self.outbound = Some(outbound);
        self
    }
}

/// A running `weft-demo-app`.
#[derive(Debug)]
pub struct DemoApp {
    pub config: DemoAppConfig,
    pub process: ProcessGuard,
}

impl DemoApp {
    /// An HTTP-only demo app on a fresh loopback IP, ready to serve.
    pub async fn start(name: &str, instance: &str) -> DemoApp {
        DemoApp::start_with(DemoAppConfig::new(name, instance)).await
    }

    /// Starts the app and waits until each of its listeners accepts connections. Its ports were
    /// picked free and released: if something else on the machine took one in between (the app
    /// exits with "Address already in use"), fresh ports are picked and the app started again,
    /// up to three times.
    pub async fn start_with(mut config: DemoAppConfig) -> DemoApp {
        for attempt in 1.. {
            let mut app = DemoApp::spawn(config.clone());
            if app.wait_ready().await {
                return app;
            }
            assert!(
                attempt < 3,
                "{}: its ports were taken three times\n{}",
                app.process.name(),
                app.process.describe()
            );
            app.process.stop();
            config = config.with_fresh_ports();
        }
        unreachable!("the loop returns or panics")
    }

    fn spawn(config: DemoAppConfig) -> DemoApp {
        let mut cmd = Command::new(bin_path("weft-demo-app"));
        cmd.arg("--name")
            .arg(&config.name)
            .arg("--instance")
            .arg(&config.instance)
            .arg("--http")
            .arg(config.http.to_string());
        if let Some(a) = config.grpc {
            cmd.arg("--grpc").arg(a.to_string());
        }
        if let Some(a) = config.tcp {
            cmd.arg("--tcp").arg(a.to_string());
        }
        if let Some(a) = config.outbound {
            cmd.arg("--outbound").arg(a.to_string());
        }
        let process = ProcessGuard::spawn(&format!("weft-demo-app[{}]", config.instance), cmd);
        DemoApp { config, process }
    }

    /// Waits until the app serves; `false` if it exited because a port was taken.
    async fn wait_ready(&mut self) -> bool {
        let url = format!("http://{}/", self.config.http);
        let others: Vec<SocketAddr> = self
            .config
            .grpc
            .into_iter()
            .chain(self.config.tcp)
            .collect();
        let what = format!(
            "weft-demo-app {} serves {url} and accepts on {others:?}",
            self.config.instance
        );
        let process = &mut self.process;
        let mut port_taken = false;
        wait_until(DEFAULT_WAIT, &what, async || {
            if port_taken {
                return Ok(());
            }
            if let Some(status) = process.try_exit_status() {
                if process.log().contains("Address already in use") {
                    port_taken = true;
                    return Ok(());
                }
                panic!(
                    "{} exited ({status})\n{}",
                    process.name(),
                    process.describe()
                );
            }
            let r = http_get(&url).await?;
            if r.status != 200 {
                anyhow::bail!("GET {url}: {}", r.summary());
            }
            for a in &others {
                tokio::net::TcpStream::connect(a).await?;
            }
            Ok(())
        })
        .await;
        !port_taken
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.config.http
    }

    /// The gRPC address; panics if the app was started without `--grpc`.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.config.grpc.expect("demo app started without --grpc")
    }

    /// The TCP echo address; panics if the app was started without `--tcp`.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.config.tcp.expect("demo app started without --tcp")
    }
}

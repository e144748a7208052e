//! Egress to services outside the mesh declared by DNS name (`endpoints: [{host, port}]`): the
//! sidecar resolves the name through a real DNS server (dnsmasq, started here on loopback and
//! given to the sidecar as its bootstrap `dns.nameservers`), the app calls `http://<service>/`
//! in plaintext, and the sidecar originates TLS (`tls:`) to a real HTTPS server outside the mesh
//! (Python's `http.server` behind `ssl`, with certificates from a CA made here with `openssl`).
//!
//! Needs `dnsmasq`, `openssl` and `python3` (scripts/install-test-deps.sh).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weft_e2e::{caller_proxy_config, wait_metric_at_least};
use weft_testkit::{
    free_port, next_loopback_ip, wait_until, ControlPlane, HttpClient, HttpResponse, PolicyDir,
    ProcessGuard, Proxy, DEFAULT_WAIT,
};

/// The external service's DNS name (resolved only by the test's DNS server).
const NAME: &str = "api.external.test";

/// `tool` on PATH or in /usr/sbin (dnsmasq's home, not on every PATH).
fn tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| panic!("`{name}` is not installed: run scripts/install-test-deps.sh"))
}

/// Runs `openssl <args>` (whitespace-separated, no quoting) in `dir`, panicking with its output
/// on failure.
fn openssl(dir: &Path, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    let out = Command::new(tool("openssl"))
        .args(&args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate and its key, as files.
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
}

impl CertFiles {
    fn pem(&self) -> String {
        std::fs::read_to_string(&self.cert)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.cert.display()))
    }
}

/// Certificates made with `openssl` in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Pki {
            dir: tempfile::Builder::new()
                .prefix("weft-egress-pki-")
                .tempdir()
                .unwrap_or_else(|e| panic!("cannot create a PKI dir: {e}")),
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A self-signed CA `name` (ECDSA P-256, one day).
    fn ca(&self, name: &str) -> CertFiles {
        let (cert, key) = (format!("{name}.pem"), format!("{name}-key.pem"));
        openssl(
            self.dir.path(),
            &format!(
                "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {key} \
                 -out {cert} -days 1 -subj /CN={name} \
                 -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign"
            ),
        );
        CertFiles {
            cert: self.path(&cert),
            key: self.path(&key),
        }
    }

    /// A leaf `cn` signed by `ca`: a server certificate for DNS name `cn`, or a client one.
    fn leaf(&self, ca: &CertFiles, cn: &str, client: bool) -> CertFiles {
        let (cert, key, csr, ext) = (
            format!("{cn}.pem"),
            format!("{cn}-key.pem"),
            format!("{cn}.csr"),
            format!("{cn}.ext"),
        );
        let usage = if client {
            "extendedKeyUsage=clientAuth\n".to_owned()
        } else {
            format!("extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{cn}\n")
        };
        std::fs::write(
            self.path(&ext),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{usage}"),
        )
        .unwrap_or_else(|e| panic!("cannot write {ext}: {e}"));
        openssl(
            self.dir.path(),
            &format!(
                "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {key} \
                 -out {csr} -subj /CN={cn}"
            ),
        );
        openssl(
            self.dir.path(),
            &format!(
                "x509 -req -in {csr} -CA {} -CAkey {} -CAcreateserial -out {cert} -days 1 \
                 -extfile {ext}",
                ca.cert.display(),
                ca.key.display()
            ),
        );
        CertFiles {
            cert: self.path(&cert),
            key: self.path(&key),
        }
    }
}

/// The HTTPS server outside the mesh: answers every GET with JSON naming itself, the SNI it
/// received, the path and Host it got, and the client certificate's CN (if it asked for one).
const HTTPS_SERVER: &str = r#"
import http.server, json, ssl, sys
ip, port, cert, key, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
client_ca = sys.argv[6] if len(sys.argv) > 6 else None
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
if client_ca:
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_ca)
def remember_sni(sock, server_name, _ctx):
    sock.weft_sni = server_name
ctx.sni_callback = remember_sni

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        cn = ""
        for rdn in (self.request.getpeercert() or {}).get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    cn = v
        body = json.dumps({
            "server": name,
            "sni": getattr(self.request, "weft_sni", None),
            "path": self.path,
            "host": self.headers.get("host"),
            "client_cn": cn,
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = http.server.ThreadingHTTPServer((ip, port), Handler)
server.daemon_threads = True
server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
print("listening", flush=True)
server.serve_forever()
"#;

/// A running HTTPS server.
struct HttpsServer {
    addr: SocketAddr,
    _process: ProcessGuard,
    _script: tempfile::TempDir,
}

impl HttpsServer {
    /// Starts server `name` on `addr` with `cert`, requiring a client certificate from
    /// `client_ca` if given; waits until it listens.
    async fn start(
        addr: SocketAddr,
        cert: &CertFiles,
        name: &str,
        client_ca: Option<&CertFiles>,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("weft-egress-https-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a dir: {e}"));
        let script = dir.path().join("server.py");
        std::fs::write(&script, HTTPS_SERVER).unwrap_or_else(|e| panic!("write script: {e}"));
        let mut cmd = Command::new(tool("python3"));
        cmd.arg("-u")
            .arg(&script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(&cert.cert)
            .arg(&cert.key)
            .arg(name);
        if let Some(ca) = client_ca {
            cmd.arg(&ca.cert);
        }
        let mut process = ProcessGuard::spawn(&format!("https-{name}"), cmd);
        let what = format!("the HTTPS server {name} listens on {addr}");
        wait_until(DEFAULT_WAIT, &what, async || {
            if let Some(status) = process.try_exit_status() {
                panic!("{what}: it exited ({status})\n{}", process.describe());
            }
            if process.log().contains("listening") {
                Ok(())
            } else {
                Err("not yet")
            }
        })
        .await;
        HttpsServer {
            addr,
            _process: process,
            _script: dir,
        }
    }
}

/// A DNS query for `name`'s A record (RFC 1035 wire format), id 0x5745.
fn a_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x57, 0x45, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).expect("a short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// dnsmasq answering `NAME` with one address (TTL 1s) on `addr`, nothing else.
struct Dns {
    process: ProcessGuard,
    addr: SocketAddr,
}

impl Dns {
    /// Starts dnsmasq on `addr` answering `NAME` with `ip`; waits until it answers so.
    async fn start(addr: SocketAddr, ip: IpAddr) -> Dns {
        let mut cmd = Command::new(tool("dnsmasq"));
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--log-queries",
            "--local-ttl=1",
        ])
        .arg(format!("--listen-address={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--address=/{NAME}/{ip}"));
        let mut process = ProcessGuard::spawn(&format!("dnsmasq-{addr}"), cmd);
        let what = format!("dnsmasq on {addr} answers {NAME} with {ip}");
        let query = a_query(NAME);
        wait_until(DEFAULT_WAIT, &what, async || {
            if let Some(status) = process.try_exit_status() {
                panic!("{what}: dnsmasq exited ({status})\n{}", process.describe());
            }
            let sock = tokio::net::UdpSocket::bind((addr.ip(), 0)).await?;
            sock.send_to(&query, addr).await?;
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf))
                .await
                .map_err(|_| anyhow::anyhow!("no answer"))??;
            let IpAddr::V4(v4) = ip else {
                anyhow::bail!("the test answers IPv4 only")
            };
            if n >= 4 && buf[n - 4..n] == v4.octets() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("answer {:?}", &buf[..n]))
            }
        })
        .await;
        Dns { process, addr }
    }

    /// Stops it (the address stays free for a restart).
    fn stop(&mut self) {
        self.process.stop();
    }
}

/// The port nothing listens on, over UDP and TCP, at `ip` a moment ago (dnsmasq binds both).
fn free_dns_addr(ip: IpAddr) -> SocketAddr {
    for _ in 0..50 {
        let port = free_port(ip);
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return SocketAddr::new(ip, port);
        }
    }
    panic!("no port free over both TCP and UDP on {ip}");
}

/// `text` with every line indented by `n` spaces (a PEM in a YAML block scalar).
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines()
        .map(|l| format!("{pad}{l}\n"))
        .collect::<String>()
}

/// A service `name` at `NAME:port` with TLS origination: `roots` verify the server, `client`
/// (cert, key) is presented if given.
fn external_service(name: &str, port: u16, roots: &str, client: Option<&CertFiles>) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    endpoints:\n      - host: {NAME}\n        port: {port}\n    tls:\n      roots_pem: |\n{}",
        indent(roots, 8)
    );
    if let Some(c) = client {
        yaml.push_str(&format!(
            "      client_cert_file: {}\n      client_key_file: {}\n",
            c.cert.display(),
            c.key.display()
        ));
    }
    yaml
}

/// Starts the caller `web`'s sidecar resolving names through `dns`.
async fn web_sidecar(cp: &ControlPlane, dns: &Dns) -> Proxy {
    let mut config = caller_proxy_config(cp, "web", "web-1");
    config.dns_nameservers = vec![dns.addr];
    Proxy::start_with(config).await
}

/// The JSON the HTTPS server answered.
fn served(r: &HttpResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.summary()))
}

/// Waits until `GET http://<host><path>` is answered 200 by HTTPS server `server`.
async fn wait_served_by(client: &HttpClient, host: &str, path: &str, server: &str) -> HttpResponse {
    let what = format!("GET http://{host}{path} is answered 200 by the HTTPS server {server}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let r = client.get(host, path).await?;
        if r.status == 200 && served(&r)["server"] == server {
            Ok(r)
        } else {
            Err(anyhow::anyhow!("{}", r.summary()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_calls_an_https_service_by_dns_name_in_plaintext() {
    let pki = Pki::new();
    let ca = pki.ca("external-root");
    let other_ca = pki.ca("some-other-root");
    let server_cert = pki.leaf(&ca, NAME, false);
    let ext_ip = next_loopback_ip();
    let server = HttpsServer::start(
        SocketAddr::new(ext_ip, free_port(ext_ip)),
        &server_cert,
        "one",
        None,
    )
    .await;
    let port = server.addr.port();
    let dns = Dns::start(free_dns_addr(next_loopback_ip()), ext_ip).await;
    let policy = format!(
        "services:\n  - name: web\n{}{}",
        external_service("stripe", port, &ca.pem(), None),
        external_service("untrusted", port, &other_ca.pem(), None),
    );
    let policies = PolicyDir::with_file("egress.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let web = web_sidecar(&cp, &dns).await;

    // The app speaks plaintext HTTP to its sidecar; the server saw TLS with SNI = the name.
    let r = wait_served_by(&web.http1(), "stripe", "/v1/charges?limit=3", "one").await;
    let body = served(&r);
    assert_eq!(body["sni"], NAME, "{body}");
    assert_eq!(body["path"], "/v1/charges?limit=3", "{body}");
    // Also from an h2c client (the upstream stays HTTP/1.1 over TLS).
    let r = web
        .h2c()
        .get("stripe", "/h2")
        .await
        .expect("h2c GET http://stripe/h2");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert_eq!(served(&r)["sni"], NAME);

    // Roots that do not trust the server: refused, 503 connect-failed naming why.
    let what = "GET http://untrusted/ answers 503 connect-failed naming the verification error";
    let r = wait_until(DEFAULT_WAIT, what, async || {
        let r = web.http1().get("untrusted", "/").await?;
        if r.status == 503 && r.header("x-weft-error") == Some("connect-failed") {
            Ok(r)
        } else {
            Err(anyhow::anyhow!("{}", r.summary()))
        }
    })
    .await;
    assert!(
        r.text().contains("UnknownIssuer") && r.text().contains(NAME),
        "the body names the verification error and the server name: {:?}",
        r.text()
    );

    wait_metric_at_least(
        "web's sidecar counts its resolutions of the name",
        "weft_dns_resolutions_total",
        &[("cluster", "stripe.default"), ("result", "ok")],
        1.0,
        async || web.metrics().await,
    )
    .await;
    for (result, what) in [
        ("ok", "the handshakes that worked"),
        ("error", "the refused one"),
    ] {
        wait_metric_at_least(
            &format!("web's sidecar counts {what}"),
            "weft_tls_handshakes_total",
            &[("direction", "outbound"), ("result", result)],
            1.0,
            async || web.metrics().await,
        )
        .await;
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_follows_a_changed_dns_answer() {
    let pki = Pki::new();
    let ca = pki.ca("external-root");
    let cert = pki.leaf(&ca, NAME, false);
    // Two servers for the same name and port on two IPs: the DNS answer picks one.
    let (ip1, ip2) = (next_loopback_ip(), next_loopback_ip());
    let port = free_port(ip1);
    let _one = HttpsServer::start(SocketAddr::new(ip1, port), &cert, "one", None).await;
    let _two = HttpsServer::start(SocketAddr::new(ip2, port), &cert, "two", None).await;
    let dns_addr = free_dns_addr(next_loopback_ip());
    let mut dns = Dns::start(dns_addr, ip1).await;
    let policy = format!(
        "services:\n  - name: web\n{}",
        external_service("stripe", port, &ca.pem(), None)
    );
    let policies = PolicyDir::with_file("egress.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let web = web_sidecar(&cp, &dns).await;
    let client = web.http1();
    wait_served_by(&client, "stripe", "/", "one").await;

    // The DNS server goes away: resolutions fail (counted) and the last good address stays.
    dns.stop();
    let errors = |m: &weft_testkit::Metrics| {
        m.sum(
            "weft_dns_resolutions_total",
            &[("cluster", "stripe.default"), ("result", "error")],
        )
    };
    let before = errors(&web.metrics().await);
    wait_metric_at_least(
        "web's sidecar counts failed resolutions while the DNS server is down",
        "weft_dns_resolutions_total",
        &[("cluster", "stripe.default"), ("result", "error")],
        before + 1.0,
        async || web.metrics().await,
    )
    .await;
    for i in 0..5 {
        let r = client.get("stripe", "/").await.expect("GET http://stripe/");
        assert_eq!(
            r.status,
            200,
            "request {i} while DNS is down: {}",
            r.summary()
        );
        assert_eq!(served(&r)["server"], "one", "the last good address stays");
    }

    // The name moves to the second server: the sidecar follows within a bounded wait (TTL 1s).
    let _dns = Dns::start(dns_addr, ip2).await;
    wait_served_by(&client, "stripe", "/", "two").await;
    for i in 0..10 {
        let r = client.get("stripe", "/").await.expect("GET http://stripe/");
        assert_eq!(r.status, 200, "request {i}: {}", r.summary());
        assert_eq!(
            served(&r)["server"],
            "two",
            "request {i}: the old address is gone"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_files() {
    let pki = Pki::new();
    let ca = pki.ca("external-root");
    let clients = pki.ca("partner-clients");
    let cert = pki.leaf(&ca, NAME, false);
    let client = pki.leaf(&clients, "weft-egress-client", true);
    let ext_ip = next_loopback_ip();
    let port = free_port(ext_ip);
    let _server =
        HttpsServer::start(SocketAddr::new(ext_ip, port), &cert, "mtls", Some(&clients)).await;
    let dns = Dns::start(free_dns_addr(next_loopback_ip()), ext_ip).await;
    let services = |partner_client: &CertFiles| {
        format!(
            "services:\n  - name: web\n{}{}",
            external_service("partner", port, &ca.pem(), Some(partner_client)),
            external_service("anonymous", port, &ca.pem(), None),
        )
    };
    let policies = PolicyDir::with_file("egress.yaml", &services(&client));
    let cp = ControlPlane::start(policies.path()).await;
    let web = web_sidecar(&cp, &dns).await;
    let http = web.http1();

    let r = wait_served_by(&http, "partner", "/", "mtls").await;
    assert_eq!(
        served(&r)["client_cn"],
        "weft-egress-client",
        "{}",
        r.summary()
    );
    // Without a client certificate the server refuses the connection.
    let what = "GET http://anonymous/ fails (the server requires a client certificate)";
    wait_until(DEFAULT_WAIT, what, async || {
        let r = http.get("anonymous", "/").await?;
        if matches!(r.status.as_u16(), 502 | 503) && r.header("x-weft-error").is_some() {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{}", r.summary()))
        }
    })
    .await;

    // A client certificate file the sidecar cannot read: the push is NACKed naming the file,
    // and the last good configuration keeps serving.
    let missing = CertFiles {
        cert: pki.path("missing-client.pem"),
        key: client.key.clone(),
    };
    policies.write("egress.yaml", &services(&missing));
    let needle = missing.cert.display().to_string();
    let what = format!("web's sidecar NACKs the push naming {needle}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let proxies = cp.proxies().await;
        let nack = proxies
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["id"] == "web-1")
            .map(|p| p["last_nack"].to_string())
            .unwrap_or_default();
        if nack.contains(&needle) && nack.contains("client_cert_file") {
            Ok(())
        } else {
            Err(format!("last_nack: {nack}"))
        }
    })
    .await;
    let r = http.get("partner", "/").await.expect("GET http://partner/");
    assert_eq!(
        r.status,
        200,
        "the last good config serves: {}",
        r.summary()
    );
}

//! The secure path of test meshes: every [`crate::ControlPlane`] runs a CA (`--ca-dir`) and, by
//! default, TLS gRPC (`--grpc-tls`); every [`crate::Proxy`] pointed at it trusts
//! `<ca-dir>/roots.pem` (`control_plane_ca`) and certifies with its service's join token.
//!
//! A control plane's CA directory is a function of its gRPC address, so a proxy configured with
//! a `http://<addr>` URL before that control plane even started (tests of start-up order) is
//! still pointed at the right CA: its URL is rewritten to `https://` and its token is derived
//! from the token secret the testkit writes ahead of the control plane (which then loads it).
//! A control plane started with `grpc_tls: false` or `ca: false` registers that here, and
//! proxies pointed at it keep a plaintext channel / run without an identity.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::bin_path;

/// Whether testkit control planes run a CA and TLS gRPC unless told otherwise.
pub const SECURE_BY_DEFAULT: bool = true;

/// How a control plane at some gRPC address is secured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpSecurity {
    /// Its CA directory (`None`: started without `--ca-dir`).
    pub ca_dir: Option<PathBuf>,
    /// Whether its gRPC port is TLS.
    pub grpc_tls: bool,
}

fn registry() -> &'static Mutex<HashMap<SocketAddr, CpSecurity>> {
    static R: OnceLock<Mutex<HashMap<SocketAddr, CpSecurity>>> = OnceLock::new();
    R.get_or_init(Mutex::default)
}

/// Records how the control plane at `grpc` runs.
pub fn register(grpc: SocketAddr, security: CpSecurity) {
    registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(grpc, security);
}

/// How the control plane at `grpc` runs: as registered, else the default (CA + TLS gRPC).
pub fn security_of(grpc: SocketAddr) -> CpSecurity {
    registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&grpc)
        .cloned()
        .unwrap_or_else(|| CpSecurity {
            ca_dir: Some(default_ca_dir(grpc)),
            grpc_tls: true,
        })
}

/// The CA directory a testkit control plane on `grpc` uses unless told otherwise (created 0700).
pub fn default_ca_dir(grpc: SocketAddr) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("weft-testkit-{}", std::process::id()))
        .join(format!("ca-{}-{}", grpc.ip(), grpc.port()));
    create_private_dir(&dir);
    dir
}

fn create_private_dir(dir: &Path) {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .unwrap_or_else(|e| panic!("cannot create CA dir {}: {e}", dir.display()));
}

/// `<ca-dir>/roots.pem`: what proxies trust the control plane's gRPC certificate with.
pub fn roots_pem(ca_dir: &Path) -> PathBuf {
    ca_dir.join("roots.pem")
}

/// Writes `<ca-dir>/token.key` (32 random bytes, base64url, mode 0600) unless it exists; the
/// control plane loads an existing one at start.
pub fn ensure_token_secret(ca_dir: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    create_private_dir(ca_dir);
    let path = ca_dir.join("token.key");
    if path.exists() {
        return;
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap_or_else(|e| panic!("reading /dev/urandom: {e}"));
    let text = format!("{}\n", base64url(&bytes));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => f
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display())),
        // Another test in this process wrote it first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("creating {}: {e}", path.display()),
    }
}

/// The join token of `namespace/service`, printed by `weft-control token --ca-dir ...`.
pub fn join_token(ca_dir: &Path, service: &str, namespace: &str) -> String {
    ensure_token_secret(ca_dir);
    let out = Command::new(bin_path("weft-control"))
        .arg("token")
        .arg("--ca-dir")
        .arg(ca_dir)
        .arg("--service")
        .arg(service)
        .arg("--namespace")
        .arg(namespace)
        .output()
        .unwrap_or_else(|e| panic!("running weft-control token: {e}"));
    assert!(
        out.status.success(),
        "weft-control token --ca-dir {} --service {service} --namespace {namespace}: {}\n{}",
        ca_dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn base64url(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=c.len() {
            out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// The `host:port` of an `http(s)://host:port[/]` URL, if it is an IP address.
pub fn url_addr(url: &str) -> Option<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    rest.trim_end_matches('/').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_without_padding() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(&[7u8; 32]).len(), 43);
    }

    #[test]
    fn url_addrs() {
        assert_eq!(
            url_addr("http://127.0.0.1:15010"),
            Some("127.0.0.1:15010".parse().unwrap())
        );
        assert_eq!(
            url_addr("https://127.0.0.2:1/"),
            Some("127.0.0.2:1".parse().unwrap())
        );
        assert_eq!(url_addr("http://localhost:1"), None);
    }
}

/// A certificate obtained from a control plane's `Identity.Certify`, on disk for `openssl`.
#[derive(Debug)]
pub struct CertFiles {
    /// Holds the files.
    pub dir: tempfile::TempDir,
    /// Leaf (+ chain) PEM.
    pub cert: PathBuf,
    /// Private key PEM.
    pub key: PathBuf,
    /// The SPIFFE ID the control plane put in it.
    pub spiffe_id: String,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

/// Runs `openssl` with `args` in `dir`, panicking with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running openssl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A gRPC channel to the control plane at `grpc` (TLS verified with its roots when it serves
/// TLS), presenting no client certificate.
pub async fn control_channel(grpc: SocketAddr) -> tonic::transport::Channel {
    control_channel_as(grpc, None).await
}

/// Generates a P-256 key and CSR with `openssl` and has the control plane at `grpc` certify it
/// as `namespace/service` for `ttl` (0 = its default), using the service's join token.
pub async fn certify_with_openssl(
    grpc: SocketAddr,
    service: &str,
    namespace: &str,
    ttl: std::time::Duration,
) -> Result<CertFiles, tonic::Status> {
    use weft_proto::v1::identity_client::IdentityClient;
    let ca_dir = security_of(grpc)
        .ca_dir
        .unwrap_or_else(|| panic!("the control plane at {grpc} runs without a CA"));
    let dir = tempfile::Builder::new()
        .prefix("weft-cert-")
        .tempdir()
        .unwrap_or_else(|e| panic!("temp dir: {e}"));
    openssl(
        dir.path(),
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "csr.pem",
            "-subj",
            "/CN=test",
        ],
    );
    let csr_pem = std::fs::read_to_string(dir.path().join("csr.pem"))
        .unwrap_or_else(|e| panic!("reading csr.pem: {e}"));
    let token = join_token(&ca_dir, service, namespace);
    let mut client = IdentityClient::new(control_channel(grpc).await);
    let resp = client
        .certify(weft_proto::v1::CertifyRequest {
            csr_pem,
            token,
            service: service.into(),
            namespace: namespace.into(),
            requested_ttl_seconds: ttl.as_secs(),
        })
        .await?
        .into_inner();
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, &resp.cert_chain_pem).unwrap_or_else(|e| panic!("writing cert: {e}"));
    Ok(CertFiles {
        key: dir.path().join("key.pem"),
        cert,
        dir,
        spiffe_id: resp.spiffe_id,
        not_after: resp.not_after_unix,
    })
}

/// A CA of its own (`openssl`), outside the mesh, and a leaf for `spiffe_id` signed by it.
pub fn foreign_cert(spiffe_id: &str) -> CertFiles {
    let dir = tempfile::Builder::new()
        .prefix("weft-foreign-")
        .tempdir()
        .unwrap_or_else(|e| panic!("temp dir: {e}"));
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=foreign root",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(d, &args);
    let mut args = vec!["req", "-new"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=foreign",
    ]);
    openssl(d, &args);
    std::fs::write(
        d.join("ext.cnf"),
        format!(
            "subjectAltName=URI:{spiffe_id}\nextendedKeyUsage=clientAuth,serverAuth\nkeyUsage=critical,digitalSignature\n"
        ),
    )
    .unwrap_or_else(|e| panic!("writing ext.cnf: {e}"));
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
    CertFiles {
        cert: d.join("cert.pem"),
        key: d.join("key.pem"),
        dir,
        spiffe_id: spiffe_id.to_owned(),
        not_after: 0,
    }
}

/// What `openssl s_client` got back for one HTTP/1.1 request.
#[derive(Debug)]
pub struct SClientOutcome {
    /// Whether s_client exited 0.
    pub success: bool,
    /// Everything it printed to stdout (the HTTP response, if any).
    pub stdout: String,
    /// Its stderr (handshake errors, alerts).
    pub stderr: String,
}

impl SClientOutcome {
    /// Whether an HTTP response came back.
    pub fn got_http_response(&self) -> bool {
        self.stdout.contains("HTTP/1.1 ")
    }
}

/// Sends `GET <path>` (with `connection: close`) to `addr` through `openssl s_client` (TLS 1.3,
/// ALPN http/1.1), presenting `cert`/`key` when given and verifying the server with `ca`.
/// Bounded by 10 s.
pub async fn s_client_get(
    addr: SocketAddr,
    cert: Option<(&Path, &Path)>,
    ca: &Path,
    path: &str,
) -> SClientOutcome {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-tls1_3")
        .arg("-alpn")
        .arg("http/1.1")
        .arg("-quiet")
        .arg("-verify_return_error")
        .arg("-CAfile")
        .arg(ca);
    if let Some((c, k)) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning openssl: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        let req = format!("GET {path} HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n");
        let _ = stdin.write_all(req.as_bytes()).await;
        // Keep stdin open until the server answers or closes (-quiet implies -ign_eof).
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            drop(stdin);
        });
    }
    match tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output()).await {
        Ok(Ok(out)) => SClientOutcome {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("waiting for openssl s_client: {e}"),
        Err(_) => SClientOutcome {
            success: false,
            stdout: String::new(),
            stderr: "timed out after 10s".into(),
        },
    }
}

/// The PEM leaf certificate the TLS server at `addr` presents (no client certificate offered),
/// and its `notAfter=` / `serial=` lines from `openssl x509`.
pub fn server_leaf(addr: SocketAddr) -> (String, String) {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-tls1_3"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running openssl s_client: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let begin = text.find("-----BEGIN CERTIFICATE-----");
    let end = text.find("-----END CERTIFICATE-----");
    let (Some(b), Some(e)) = (begin, end) else {
        panic!(
            "no certificate from {addr}: {}\n{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let pem = text[b..e + "-----END CERTIFICATE-----".len()].to_string() + "\n";
    let mut child = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-enddate",
            "-serial",
            "-ext",
            "subjectAltName",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running openssl x509: {e}"));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap_or_else(|| unreachable!("piped"));
        let _ = stdin.write_all(pem.as_bytes());
    }
    let info = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("openssl x509: {e}"));
    (pem, String::from_utf8_lossy(&info.stdout).into_owned())
}

/// A fake proxy registered with the control plane at `grpc`; deregistered when dropped.
#[derive(Debug)]
pub struct FakeNode {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gRPC channel to the control plane at `grpc` presenting `cert` (an SVID from
/// [`certify_with_openssl`]) as the TLS client certificate; plaintext when the control plane
/// serves plaintext gRPC.
pub async fn control_channel_as(
    grpc: SocketAddr,
    cert: Option<&CertFiles>,
) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let sec = security_of(grpc);
    let tls = sec.grpc_tls && sec.ca_dir.is_some();
    let url = format!("{}://{grpc}", if tls { "https" } else { "http" });
    let mut endpoint = Endpoint::from_shared(url.clone())
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .connect_timeout(std::time::Duration::from_secs(5));
    if let (true, Some(dir)) = (tls, &sec.ca_dir) {
        let roots = std::fs::read_to_string(roots_pem(dir))
            .unwrap_or_else(|e| panic!("reading {}: {e}", roots_pem(dir).display()));
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(roots));
        if let Some(c) = cert {
            let read = |p: &Path| {
                std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            };
            config = config.identity(Identity::from_pem(read(&c.cert), read(&c.key)));
        }
        endpoint = endpoint
            .tls_config(config)
            .unwrap_or_else(|e| panic!("TLS config for {url}: {e}"));
    }
    endpoint
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to the control plane at {url}: {e:?}"))
}

/// Opens a discovery stream as `cert` (no certificate: `None`) announcing `node`; `Ok` once the
/// control plane pushed the first config (the node is registered, and stays so, acking every
/// push, until the [`FakeNode`] drops), else the status the stream was refused with.
pub async fn try_register_node(
    grpc: SocketAddr,
    cert: Option<&CertFiles>,
    node: weft_proto::v1::Node,
) -> Result<FakeNode, tonic::Status> {
    use weft_proto::v1::{self, discovery_client::DiscoveryClient, discovery_request::Kind};
    let mut client = DiscoveryClient::new(control_channel_as(grpc, cert).await);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let hello = v1::DiscoveryRequest {
        kind: Some(Kind::Hello(v1::Hello {
            node: Some(node),
            held: Vec::new(),
        })),
    };
    tx.send(hello)
        .await
        .unwrap_or_else(|_| unreachable!("receiver alive"));
    let mut responses = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(std::time::Duration::from_secs(15), responses.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no push within 15s"))??
        .ok_or_else(|| tonic::Status::aborted("the stream ended without a push"))?;
    let task = tokio::spawn(async move {
        let mut next = Some(first);
        while let Some(resp) = next.take() {
            let ack = v1::DiscoveryRequest {
                kind: Some(Kind::Ack(v1::Ack {
                    nonce: resp.nonce,
                    versions: Vec::new(),
                })),
            };
            if tx.send(ack).await.is_err() {
                return;
            }
            next = responses.message().await.ok().flatten();
        }
    });
    Ok(FakeNode { task })
}

/// Registers a node of `namespace/service` at `inbound_address` (whatever really listens
/// there) the authenticated way: with an SVID for that service from `Identity.Certify` (its join
/// token) as the client certificate. What a workload holding that service's credentials can do.
pub async fn register_fake_node(
    grpc: SocketAddr,
    id: &str,
    service: &str,
    namespace: &str,
    inbound_address: SocketAddr,
) -> FakeNode {
    let cert = if security_of(grpc).grpc_tls {
        Some(
            certify_with_openssl(grpc, service, namespace, std::time::Duration::ZERO)
                .await
                .unwrap_or_else(|e| panic!("Certify {namespace}/{service}: {e}")),
        )
    } else {
        None
    };
    let node = weft_proto::v1::Node {
        id: id.into(),
        service: service.into(),
        namespace: namespace.into(),
        inbound_address: inbound_address.to_string(),
        ..Default::default()
    };
    let fake = try_register_node(grpc, cert.as_ref(), node)
        .await
        .unwrap_or_else(|e| panic!("registering fake node {id} as {namespace}/{service}: {e}"));
    // The certificate files may go: TLS keeps the connection's identity.
    drop(cert);
    fake
}

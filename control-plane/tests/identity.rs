//! Identity.Certify and the gRPC port's TLS on a real control plane on loopback: real CSRs
//! (the key never leaves the test), verification of the issued chain against the served roots,
//! join tokens, refusal by an expiring CA, TLS clients that do and do not trust the root, the
//! trust bundle in discovery, and the binary's `token` subcommand, legacy flags and SIGHUP.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use weft_control::ca::{pem_certs, CaConfig};
use weft_control::server::IdentityConfig;
use weft_control::state::ControlPlane;
use weft_control::tls::client_tls_config;
use weft_control::{Config, Server};
use weft_proto::v1::discovery_client::DiscoveryClient;
use weft_proto::v1::discovery_request::Kind;
use weft_proto::v1::identity_client::IdentityClient;
use weft_proto::v1::{CertifyRequest, CertifyResponse, DiscoveryRequest, Hello, Node};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

struct Running {
    grpc: std::net::SocketAddr,
    cp: Arc<ControlPlane>,
    ca_dir: PathBuf,
    token_secret: Option<weft_control::token::TokenSecret>,
    tls: bool,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Running {
    fn token(&self, namespace: &str, service: &str) -> String {
        self.token_secret
            .as_ref()
            .unwrap()
            .token(namespace, service)
    }

    fn roots_pem(&self) -> String {
        std::fs::read_to_string(self.ca_dir.join("roots.pem")).unwrap()
    }

    async fn channel(&self) -> Channel {
        if self.tls {
            tls_channel(self.grpc, &self.roots_pem(), "localhost")
                .await
                .unwrap()
        } else {
            Endpoint::from_shared(format!("http://{}", self.grpc))
                .unwrap()
                .connect()
                .await
                .unwrap()
        }
    }

    async fn certify(&self, req: CertifyRequest) -> Result<CertifyResponse, tonic::Status> {
        IdentityClient::new(self.channel().await)
            .certify(req)
            .await
            .map(tonic::Response::into_inner)
    }
}

/// Opens a discovery stream on `channel` announcing `node`: the first push, or the status the
/// stream was refused with.
async fn discover(
    channel: Channel,
    node: Node,
) -> Result<weft_proto::v1::DiscoveryResponse, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Hello(Hello {
            node: Some(node),
            held: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let mut stream = DiscoveryClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The sender stays open (the stream lives) until the first answer.
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an answer within 5s")?
        .ok_or_else(|| tonic::Status::aborted("ended without a push"))?;
    drop(tx);
    Ok(first)
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    roots_pem: &str,
    domain: &str,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(client_tls_config(roots_pem, domain))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A control plane with a CA in `<tmp>/ca`; `tweak` adjusts the identity settings.
async fn start(tweak: impl FnOnce(&Path, &mut IdentityConfig)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("mesh.yaml"),
        "services:\n  - name: web\n  - name: api\n",
    )
    .unwrap();
    let ca_dir = dir.path().join("ca");
    let mut identity = IdentityConfig::new(&ca_dir);
    tweak(dir.path(), &mut identity);
    let tls = identity.grpc_tls;
    let server = Server::bind_with(
        Config {
            policies,
            grpc: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            deregister_grace: Duration::from_secs(1),
            push_timeout: Duration::from_secs(30),
            state_dir: None,
            restart_grace: weft_control::server::DEFAULT_RESTART_GRACE,
            // These tests are about the gRPC port; the admin API's auth has its own tests.
            insecure_admin: true,
            ..Config::new(".")
        },
        Some(identity),
    )
    .await
    .unwrap();
    assert_eq!(server.grpc_tls(), tls);
    let grpc = server.grpc_addr().unwrap();
    let cp = Arc::clone(server.control_plane());
    let token_secret = server.ca().map(|ca| ca.token_secret().clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(server.serve(async {
        let _ = rx.await;
    }));
    Running {
        grpc,
        cp,
        ca_dir,
        token_secret,
        tls,
        shutdown: Some(tx),
        _dir: dir,
    }
}

fn csr_for(key: &KeyPair) -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "whatever the proxy says");
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn request(run: &Running, key: &KeyPair, service: &str, ttl: u64) -> CertifyRequest {
    CertifyRequest {
        csr_pem: csr_for(key),
        token: run.token("default", service),
        service: service.into(),
        namespace: "default".into(),
        requested_ttl_seconds: ttl,
    }
}

/// Verifies `chain_pem` (leaf first) against `roots` the way a peer sidecar will: webpki, as a
/// client certificate (no name check; clientAuth EKU required).
fn verify_chain(chain_pem: &str, roots: &[String]) -> Result<(), rustls::Error> {
    let chain: Vec<CertificateDer<'static>> = pem_certs(chain_pem)
        .unwrap()
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        for der in pem_certs(root).unwrap() {
            store.add(CertificateDer::from(der)).unwrap();
        }
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        weft_control::tls::provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map(|_| ())
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

fn certificates_issued(cp: &ControlPlane, result: &str) -> u64 {
    cp.metrics()
        .certificates_issued_total
        .with_label_values(&[result])
        .get()
}

/// A user root valid until `not_after`, written to `dir`; returns (cert, key) paths.
fn write_user_root(dir: &Path, name: &str, not_after: OffsetDateTime) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("user root {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::days(60);
    params.not_after = not_after;
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[tokio::test]
async fn certify_signs_the_proxys_csr_into_a_verifiable_svid() {
    let run = start(|_, _| {}).await;
    let key = KeyPair::generate().unwrap(); // stays here: only the CSR is sent
    let before = OffsetDateTime::now_utc().unix_timestamp();
    let resp = run.certify(request(&run, &key, "web", 600)).await.unwrap();

    assert_eq!(resp.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(resp.trust_domain, "cluster.local");
    assert_eq!(resp.roots_pem.concat(), run.roots_pem());
    verify_chain(&resp.cert_chain_pem, &resp.roots_pem).unwrap();

    let chain = pem_certs(&resp.cert_chain_pem).unwrap();
    assert_eq!(uri_sans(&chain[0]), vec![resp.spiffe_id.clone()]);
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the certificate carries the proxy's own key"
    );
    let not_after = leaf.validity().not_after.timestamp();
    assert_eq!(not_after, resp.not_after_unix);
    assert!(
        (not_after - (before + 600)).abs() <= 2,
        "10 min as requested"
    );
    assert_eq!(certificates_issued(&run.cp, "ok"), 1);

    // 0 = the default (24h); more than the maximum is capped at it.
    for ttl in [0, 7 * 86400] {
        let resp = run.certify(request(&run, &key, "web", ttl)).await.unwrap();
        let left = resp.not_after_unix - OffsetDateTime::now_utc().unix_timestamp();
        assert!((left - 86400).abs() <= 5, "ttl {ttl}: {left}s left");
    }

    // openssl agrees.
    let leaf_path = run.ca_dir.join("leaf-test.pem");
    std::fs::write(&leaf_path, resp_first_pem(&resp.cert_chain_pem)).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf_path)
        .output()
        .expect("openssl is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/default/sa/web"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(run.ca_dir.join("roots.pem"))
        .arg(&leaf_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn resp_first_pem(chain: &str) -> String {
    let end = "-----END CERTIFICATE-----\n";
    let i = chain.find(end).unwrap() + end.len();
    chain[..i].to_owned()
}

#[tokio::test]
async fn bad_tokens_names_and_csrs_are_refused() {
    let run = start(|_, _| {}).await;
    let key = KeyPair::generate().unwrap();

    let mut req = request(&run, &key, "web", 0);
    req.token = "not-the-token".into();
    let err = run.certify(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(
        err.message().contains("invalid join token for default/web"),
        "{err}"
    );

    // The api service's token does not get a web identity.
    let mut req = request(&run, &key, "web", 0);
    req.token = run.token("default", "api");
    let err = run.certify(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    // Nor another namespace's.
    let mut req = request(&run, &key, "web", 0);
    req.token = run.token("prod", "web");
    assert_eq!(
        run.certify(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(certificates_issued(&run.cp, "unauthenticated"), 3);

    let mut req = request(&run, &key, "web", 0);
    req.csr_pem =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into();
    let err = run.certify(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("invalid CSR"), "{err}");

    let mut req = request(&run, &key, "web", 0);
    req.service = "../web".into();
    let err = run.certify(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(certificates_issued(&run.cp, "invalid"), 2);
    assert_eq!(certificates_issued(&run.cp, "ok"), 0);

    // An empty namespace means "default".
    let mut req = request(&run, &key, "web", 0);
    req.namespace.clear();
    let resp = run.certify(req).await.unwrap();
    assert_eq!(resp.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");
}

#[tokio::test]
async fn an_intermediate_expiring_before_the_leaf_refuses_to_sign() {
    // A user root that ends in 2h: the intermediate is capped there.
    let run = start(|tmp, id| {
        let root = write_user_root(
            tmp,
            "short",
            OffsetDateTime::now_utc() + time::Duration::hours(2),
        );
        id.ca.root = Some(root);
    })
    .await;
    let key = KeyPair::generate().unwrap();
    let err = run
        .certify(request(&run, &key, "web", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("expires at") && err.message().contains("refusing to sign"),
        "{err}"
    );
    assert_eq!(certificates_issued(&run.cp, "refused"), 1);
    let expiry = run.cp.metrics().issuer_expiry_timestamp_seconds.get();
    let in_2h = OffsetDateTime::now_utc().unix_timestamp() + 7200;
    assert!((expiry - in_2h).abs() < 10, "gauge {expiry} vs {in_2h}");

    // A lifetime within the issuer's is fine, and the chain is leaf + intermediate -> user root.
    let resp = run.certify(request(&run, &key, "web", 3600)).await.unwrap();
    assert_eq!(pem_certs(&resp.cert_chain_pem).unwrap().len(), 2);
    verify_chain(&resp.cert_chain_pem, &resp.roots_pem).unwrap();
    assert!(resp.roots_pem[0].contains("BEGIN CERTIFICATE"));
}

#[tokio::test]
async fn an_expired_root_refuses_to_sign() {
    let run = start(|tmp, id| {
        let root = write_user_root(
            tmp,
            "old",
            OffsetDateTime::now_utc() - time::Duration::days(1),
        );
        id.ca.root = Some(root);
    })
    .await;
    let key = KeyPair::generate().unwrap();
    let err = run
        .certify(request(&run, &key, "web", 60))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("expired at"), "{err}");
}

#[tokio::test]
async fn grpc_over_tls_with_roots_pem() {
    let run = start(|_, id| id.grpc_tls = true).await;
    let key = KeyPair::generate().unwrap();
    let resp = run.certify(request(&run, &key, "api", 0)).await.unwrap();
    assert_eq!(resp.spiffe_id, "spiffe://cluster.local/ns/default/sa/api");
    verify_chain(&resp.cert_chain_pem, &resp.roots_pem).unwrap();

    // The listen IP is a SAN too.
    let channel = tls_channel(run.grpc, &run.roots_pem(), "127.0.0.1")
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "weft.v1.Identity".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Discovery over TLS needs the proxy's SVID as the client certificate.
    let hello = |service: &str| Node {
        id: "web-1".into(),
        service: service.into(),
        namespace: "default".into(),
        inbound_address: "127.0.0.1:15006".into(),
        outbound_address: "127.0.0.1:15001".into(),
        app_address: "127.0.0.1:8080".into(),
        tcp_bind_ip: "127.0.0.1".into(),
        ..Node::default()
    };
    let refused = discover(run.channel().await, hello("web"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    assert!(
        refused.message().contains("client certificate"),
        "{refused}"
    );
    let web_key = KeyPair::generate().unwrap();
    let web_svid = run
        .certify(request(&run, &web_key, "web", 0))
        .await
        .unwrap();
    let as_web = || async {
        Endpoint::from_shared(format!("https://{}", run.grpc))
            .unwrap()
            .tls_config(client_tls_config(&run.roots_pem(), "localhost").identity(
                tonic::transport::Identity::from_pem(
                    &web_svid.cert_chain_pem,
                    web_key.serialize_pem(),
                ),
            ))
            .unwrap()
            .connect()
            .await
            .unwrap()
    };
    // web's certificate cannot register an instance of api.
    let refused = discover(as_web().await, hello("api")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("default/web"), "{refused}");
    // As itself: registered, and the first push carries the trust bundle.
    let first = discover(as_web().await, hello("web")).await.unwrap();
    let trust = first.trust.expect("the first push carries TRUST");
    assert_eq!(trust.trust_domain, "cluster.local");
    assert_eq!(trust.roots_pem.concat(), run.roots_pem());

    // Plaintext to a TLS port fails.
    let plain = Endpoint::from_shared(format!("http://{}", run.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert!(IdentityClient::new(plain)
        .certify(request(&run, &key, "api", 0))
        .await
        .is_err());
}

#[tokio::test]
async fn a_tls_client_that_does_not_trust_the_root_fails() {
    let run = start(|_, id| id.grpc_tls = true).await;
    let other = tempfile::tempdir().unwrap();
    let other_ca = weft_control::ca::Ca::load_or_create(&CaConfig::new(other.path())).unwrap();
    let wrong_roots = other_ca.roots_pem().concat();
    let key = KeyPair::generate().unwrap();
    let result = match tls_channel(run.grpc, &wrong_roots, "localhost").await {
        Err(e) => Err(e.to_string()),
        Ok(ch) => IdentityClient::new(ch)
            .certify(request(&run, &key, "web", 0))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    assert!(result.is_err(), "an untrusted server certificate must fail");
    // The wrong name fails too.
    let result = match tls_channel(run.grpc, &run.roots_pem(), "not-the-server.example").await {
        Err(e) => Err(e.to_string()),
        Ok(ch) => IdentityClient::new(ch)
            .certify(request(&run, &key, "web", 0))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    assert!(result.is_err());
}

#[tokio::test]
async fn extra_roots_are_in_the_bundle_and_the_state() {
    let run = start(|tmp, id| {
        let (new_root, _) = write_user_root(
            tmp,
            "next",
            OffsetDateTime::now_utc() + time::Duration::days(3650),
        );
        id.ca.extra_roots = vec![new_root];
    })
    .await;
    let trust = run.cp.trust();
    assert_eq!(trust.trust_domain, "cluster.local");
    assert_eq!(trust.roots_pem.len(), 2, "own root + the next one");
    assert_eq!(trust.roots_pem.concat(), run.roots_pem());
    let key = KeyPair::generate().unwrap();
    let resp = run.certify(request(&run, &key, "web", 0)).await.unwrap();
    assert_eq!(resp.roots_pem, trust.roots_pem);
}

#[tokio::test]
async fn without_a_ca_certify_is_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind(Config {
        policies: dir.path().to_owned(),
        grpc: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        deregister_grace: Duration::from_secs(1),
        push_timeout: Duration::from_secs(30),
        state_dir: None,
        restart_grace: weft_control::server::DEFAULT_RESTART_GRACE,
        ..Config::new(".")
    })
    .await
    .unwrap();
    let grpc = server.grpc_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(async {
        let _ = rx.await;
    }));
    let mut client = IdentityClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let err = client
        .certify(CertifyRequest {
            csr_pem: csr_for(&KeyPair::generate().unwrap()),
            token: "x".into(),
            service: "web".into(),
            namespace: "default".into(),
            requested_ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("--ca-dir"), "{err}");
    let _ = tx.send(());
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_weft-control")
}

#[test]
fn token_subcommand_prints_the_services_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = weft_control::ca::Ca::load_or_create(&CaConfig::new(dir.path())).unwrap();
    let out = Command::new(bin())
        .args(["token", "--ca-dir"])
        .arg(dir.path())
        .args(["--service", "web", "--namespace", "prod"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        ca.token_secret().token("prod", "web")
    );
    // A CA dir without a secret is an error, not a new secret.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["token", "--service", "web", "--ca-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token.key"));
}

/// The binary without a subcommand (the legacy flags) serves TLS with --grpc-tls, and SIGHUP
/// re-reads --extra-root into roots.pem.
#[tokio::test]
async fn binary_serves_tls_and_reloads_extra_roots_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let ca_dir = dir.path().join("ca");
    let extra = dir.path().join("extra.pem");
    std::fs::write(&extra, "").unwrap();
    let free = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (grpc, admin) = (free(()), free(()));
    let mut child = Command::new(bin())
        .arg("--policies")
        .arg(&policies)
        .args(["--grpc", &grpc.to_string(), "--admin", &admin.to_string()])
        .arg("--insecure-admin")
        .arg("--ca-dir")
        .arg(&ca_dir)
        .args([
            "--grpc-tls",
            "--trust-domain",
            "example.org",
            "--cert-ttl",
            "1h",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id());
    let roots_path = ca_dir.join("roots.pem");
    let mut channel = None;
    for _ in 0..100 {
        if let Ok(roots) = std::fs::read_to_string(&roots_path) {
            if let Ok(ch) = tls_channel(grpc, &roots, "localhost").await {
                channel = Some(ch);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(channel) = channel else {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "weft-control never served TLS:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let token = weft_control::token::TokenSecret::load(&ca_dir)
        .unwrap()
        .token("default", "web");
    let resp = IdentityClient::new(channel)
        .certify(CertifyRequest {
            csr_pem: csr_for(&KeyPair::generate().unwrap()),
            token,
            service: "web".into(),
            namespace: String::new(),
            requested_ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.spiffe_id, "spiffe://example.org/ns/default/sa/web");
    let left = resp.not_after_unix - OffsetDateTime::now_utc().unix_timestamp();
    assert!((left - 3600).abs() <= 5, "--cert-ttl 1h: {left}");
    assert_eq!(
        pem_certs(&std::fs::read_to_string(&roots_path).unwrap())
            .unwrap()
            .len(),
        1
    );
    drop(guard);
    let _ = child.wait();

    // Restart with an extra root (the same CA dir: the same root and token secret), then change
    // the extra root file and SIGHUP.
    let (next, _) = write_user_root(
        dir.path(),
        "next",
        OffsetDateTime::now_utc() + time::Duration::days(3650),
    );
    std::fs::copy(&next, &extra).unwrap();
    let root_before = std::fs::read_to_string(ca_dir.join("root.pem")).unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--policies"])
        .arg(&policies)
        .args(["--grpc", &grpc.to_string(), "--admin", &admin.to_string()])
        .arg("--insecure-admin")
        .arg("--ca-dir")
        .arg(&ca_dir)
        .arg("--extra-root")
        .arg(&extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let guard = KillOnDrop(pid);
    let count = || {
        std::fs::read_to_string(&roots_path)
            .ok()
            .and_then(|t| pem_certs(&t).ok())
            .map_or(0, |c| c.len())
    };
    wait_for("roots.pem with 2 roots", || count() == 2).await;
    // Serving (so the SIGHUP handler is installed).
    wait_for("GET /healthz answers 200", || healthz(admin)).await;
    assert_eq!(
        std::fs::read_to_string(ca_dir.join("root.pem")).unwrap(),
        root_before
    );
    // Rotation done: the extra file now holds the CA's own root only (deduplicated).
    std::fs::write(&extra, &root_before).unwrap();
    let st = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait_for("roots.pem back to 1 root after SIGHUP", || count() == 1).await;
    drop(guard);
    let _ = child.wait();
}

fn healthz(admin: std::net::SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut conn) = std::net::TcpStream::connect(admin) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    conn.write_all(b"GET /healthz HTTP/1.0\r\nhost: x\r\n\r\n")
        .is_ok()
        && conn.read_to_string(&mut answer).is_ok()
        && (answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..100 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
    }
}
